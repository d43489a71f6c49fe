# Homebrew formula for pgtrickle-relay (tap layout: dist/homebrew is the tap,
# `brew tap <owner>/pgtrickle-relay <repo URL>` then
# `brew install pgtrickle-relay`). It builds from the release tarball with
# cargo and installs with the project's own install.sh, so the layout is the
# same as `make install`: bin/, share/man/man1/, share/pgtrickle-relay/sql/.
class PgtrickleRelay < Formula
  desc "Moves events between PostgreSQL outbox/inbox tables and message brokers"
  homepage "https://github.com/pgtrickle/pgtrickle-relay"
  url "https://github.com/pgtrickle/pgtrickle-relay/archive/refs/tags/v0.1.0.tar.gz"
  # The release workflow's SHA256SUMS gives the value for each tag.
  sha256 "0000000000000000000000000000000000000000000000000000000000000000"
  license "Apache-2.0"
  head "https://github.com/pgtrickle/pgtrickle-relay.git", branch: "main"

  depends_on "pkgconf" => :build
  depends_on "rust" => :build

  uses_from_macos "perl" => :build
  uses_from_macos "zlib"

  def install
    system "cargo", "build", "--release", "--locked", "--features", "vendored-openssl"
    system "./install.sh", "--prefix", prefix, "--binary", "target/release/pgtrickle-relay"
  end

  test do
    assert_match "pgtrickle-relay #{version}", shell_output("#{bin}/pgtrickle-relay --version")
    assert_match "CREATE SCHEMA IF NOT EXISTS pgtrickle", shell_output("#{bin}/pgtrickle-relay sql")
    assert_path_exists share/"pgtrickle-relay/sql/00_catalog.sql"
    # Without a reachable PostgreSQL the relay says so and exits 1 (--once).
    output = shell_output("#{bin}/pgtrickle-relay --postgres-url postgres://nobody@127.0.0.1:1/x --once 2>&1", 1)
    assert_match "127.0.0.1:1", output
  end
end
