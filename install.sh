#!/usr/bin/env bash
# Install pgtrickle-relay: binary, man page, systemd unit and SQL files.
#   ./install.sh [--prefix /usr/local] [--destdir DIR] [--binary PATH]
# Layout under PREFIX: bin/pgtrickle-relay, share/man/man1/pgtrickle-relay.1,
# share/pgtrickle-relay/sql/*.sql, lib/systemd/system/pgtrickle-relay.service.
set -euo pipefail
cd "$(dirname "$0")"

prefix=/usr/local destdir="" binary=""
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) prefix=$2; shift 2 ;;
    --destdir) destdir=$2; shift 2 ;;
    --binary) binary=$2; shift 2 ;;
    -h|--help) sed -n '2,5p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [ -z "$binary" ]; then
  for b in target/pgtrickle-relay-static target/release/pgtrickle-relay; do
    [ -x "$b" ] && { binary=$b; break; }
  done
fi
[ -n "$binary" ] && [ -x "$binary" ] || { echo "install.sh: no binary: run 'make release' (or 'make static') first" >&2; exit 1; }

root="$destdir$prefix"
install -d "$root/bin" "$root/share/man/man1" "$root/share/pgtrickle-relay/sql" "$root/lib/systemd/system"
install -m 0755 "$binary" "$root/bin/pgtrickle-relay"
install -m 0644 man/pgtrickle-relay.1 "$root/share/man/man1/pgtrickle-relay.1"
install -m 0644 sql/*.sql "$root/share/pgtrickle-relay/sql/"
sed "s|/usr/local/bin/pgtrickle-relay|$prefix/bin/pgtrickle-relay|g" dist/pgtrickle-relay.service \
  > "$root/lib/systemd/system/pgtrickle-relay.service"
chmod 0644 "$root/lib/systemd/system/pgtrickle-relay.service"
echo "installed pgtrickle-relay under $root"
