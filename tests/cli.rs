//! The command line, and docs that agree with it. No database needed.
//!
//! The doc checks read the sources (flags in src/main.rs, config keys in
//! src/config.rs, src/sink/stdout.rs, src/source/stdin.rs, src/source/http.rs and
//! src/source/redis.rs), so a new
//! flag or key without docs fails here.

use std::collections::BTreeSet;
use std::io::Read;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_pgtrickle-relay");

/// Environment variables the relay reads; cleared so the caller's
/// environment cannot change what a test sees.
const RELAY_ENV: [&str; 5] = [
    "PGTRICKLE_RELAY_POSTGRES_URL",
    "PGTRICKLE_RELAY_LOG_FORMAT",
    "PGTRICKLE_RELAY_LOG_LEVEL",
    "PGTRICKLE_RELAY_GROUP_ID",
    "PGTRICKLE_RELAY_METRICS_ADDR",
];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("reading {rel}: {e}"))
}

/// The man page source with roff escapes undone, so `\-\-once` reads
/// `--once` and `\fBpath\fR` reads `path`.
fn man_text() -> String {
    let mut s = read("man/pgtrickle-relay.1")
        .replace("\\-", "-")
        .replace("\\&", "")
        .replace("\\(aq", "'")
        .replace("\\(dq", "\"")
        .replace("\\e", "\\");
    for f in ["\\fB", "\\fI", "\\fR", "\\fP"] {
        s = s.replace(f, "");
    }
    s
}

fn readme() -> String {
    read("README.md")
}

/// A relay command with none of its environment variables set.
fn relay() -> Command {
    let mut c = Command::new(BIN);
    for v in RELAY_ENV {
        c.env_remove(v);
    }
    c
}

/// Run to completion (killed after 60 s), stdin closed.
fn run(cmd: &mut Command) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning the relay");
    let mut out_pipe = child.stdout.take().unwrap();
    let mut err_pipe = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = out_pipe.read_to_end(&mut b);
        b
    });
    let err = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = err_pipe.read_to_end(&mut b);
        b
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the relay did not exit within 60 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A loopback port nothing listens on.
fn closed_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

fn help_text() -> String {
    let out = run(relay().arg("--help"));
    assert_eq!(out.status.code(), Some(0), "--help: {out:?}");
    text(&out.stdout)
}

/// Every `--long-flag` token in a text.
fn long_flags(s: &str) -> BTreeSet<String> {
    let b = s.as_bytes();
    let mut flags = BTreeSet::new();
    let mut i = 0;
    while i + 2 < b.len() {
        let starts = b[i] == b'-'
            && b[i + 1] == b'-'
            && b[i + 2].is_ascii_lowercase()
            && (i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'-'));
        if starts {
            let mut j = i + 2;
            while j < b.len()
                && (b[j].is_ascii_lowercase() || b[j].is_ascii_digit() || b[j] == b'-')
            {
                j += 1;
            }
            flags.insert(s[i..j].trim_end_matches('-').to_string());
            i = j;
        } else {
            i += 1;
        }
    }
    flags
}

/// The lines of `struct <name> { ... }` in Rust source `src`.
fn struct_body<'a>(src: &'a str, name: &str) -> Vec<&'a str> {
    let start = src
        .find(&format!("struct {name} {{"))
        .unwrap_or_else(|| panic!("struct {name} not found"));
    src[start..]
        .lines()
        .skip(1)
        .take_while(|l| l.trim() != "}")
        .collect()
}

/// Field names of a struct (attributes and comments skipped).
fn struct_fields(src: &str, name: &str) -> Vec<String> {
    struct_body(src, name)
        .iter()
        .map(|l| l.trim())
        .filter(|l| !l.starts_with('#') && !l.starts_with("//") && l.contains(':'))
        .map(|l| {
            let l = l.strip_prefix("pub ").unwrap_or(l);
            l.split(':').next().unwrap().trim().to_string()
        })
        .collect()
}

/// The flags of `struct Flags` in src/main.rs: fields marked
/// `#[argh(option ...)]` or `#[argh(switch ...)]`, as `--kebab-case`.
fn declared_flags() -> Vec<String> {
    let src = read("src/main.rs");
    let mut flags = Vec::new();
    let mut is_flag = false;
    for line in struct_body(&src, "Flags") {
        let l = line.trim();
        if l.starts_with("#[argh(") {
            is_flag = l.starts_with("#[argh(option") || l.starts_with("#[argh(switch");
        } else if !l.starts_with("///") && l.contains(':') {
            if is_flag {
                let name = l.split(':').next().unwrap().trim();
                flags.push(format!("--{}", name.replace('_', "-")));
            }
            is_flag = false;
        }
    }
    assert!(flags.len() >= 9, "parsed too few flags: {flags:?}");
    flags
}

/// Every quoted string following `anchor` in `src`, e.g. the keys of
/// `take(&mut sink, "sink", "subject")`.
fn quoted_after(src: &str, anchor: &str) -> BTreeSet<String> {
    src.match_indices(anchor)
        .filter_map(|(i, _)| {
            let rest = &src[i + anchor.len()..];
            let rest = rest.trim_start().strip_prefix('"')?;
            Some(rest[..rest.find('"')?].to_string())
        })
        .collect()
}

fn snake_case(camel: &str) -> String {
    let mut s = String::new();
    for (i, c) in camel.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                s.push('_');
            }
            s.push(c.to_ascii_lowercase());
        } else {
            s.push(c);
        }
    }
    s
}

/// Variant names of `enum <name>` as serde's snake_case.
fn enum_variants(src: &str, name: &str) -> Vec<String> {
    let start = src
        .find(&format!("enum {name} {{"))
        .unwrap_or_else(|| panic!("enum {name} not found"));
    src[start..]
        .lines()
        .skip(1)
        .take_while(|l| l.trim() != "}")
        .map(|l| l.trim())
        .filter(|l| !l.starts_with('#') && !l.starts_with("//") && !l.is_empty())
        .map(|l| snake_case(l.trim_end_matches(',')))
        .collect()
}

/// A word appears in `doc` as a whole token (not inside a longer name).
fn has_word(doc: &str, word: &str) -> bool {
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
    doc.match_indices(word).any(|(i, _)| {
        let before = doc[..i].chars().next_back();
        let after = doc[i + word.len()..].chars().next();
        !before.is_some_and(ident) && !after.is_some_and(ident)
    })
}

#[test]
fn help_exits_0_and_lists_every_flag() {
    let help = help_text();
    for flag in declared_flags() {
        assert!(help.contains(&flag), "--help does not list {flag}:\n{help}");
    }
    assert!(help.contains("-V"), "--help does not list -V:\n{help}");
    assert!(
        has_word(&help, "sql"),
        "--help does not list the sql command:\n{help}"
    );
    // Every flag that --help prints is a real one (or argh's --help).
    let mut known: BTreeSet<String> = declared_flags().into_iter().collect();
    known.insert("--help".into());
    assert_eq!(long_flags(&help), known, "flags in --help vs src/main.rs");
}

#[test]
fn every_flag_in_help_is_documented_in_the_man_page_and_readme() {
    let help = help_text();
    let flags = long_flags(&help);
    assert!(flags.contains("--postgres-url"), "parsed {flags:?}");
    let (man, readme) = (man_text(), readme());
    for flag in &flags {
        assert!(
            has_word(&man, flag),
            "man/pgtrickle-relay.1 does not document {flag}"
        );
        assert!(
            has_word(&readme, flag),
            "README.md does not document {flag}"
        );
    }
}

#[test]
fn every_environment_variable_of_main_rs_is_documented() {
    let src = read("src/main.rs");
    let vars: BTreeSet<String> = src
        .match_indices("PGTRICKLE_RELAY_")
        .map(|(i, _)| {
            src[i..]
                .chars()
                .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
                .collect()
        })
        .collect();
    assert!(
        vars.contains("PGTRICKLE_RELAY_POSTGRES_URL"),
        "parsed {vars:?}"
    );
    let (man, readme) = (man_text(), readme());
    for v in &vars {
        assert!(
            has_word(&man, v),
            "man/pgtrickle-relay.1 does not document {v}"
        );
        assert!(has_word(&readme, v), "README.md does not document {v}");
    }
    // This test clears exactly the variables the relay reads.
    let cleared: BTreeSet<String> = RELAY_ENV.iter().map(|s| s.to_string()).collect();
    assert_eq!(vars, cleared, "RELAY_ENV in tests/cli.rs is out of date");
    assert!(
        man.contains("${ENV:"),
        "the man page does not explain ${{ENV:NAME}}"
    );
}

#[test]
fn every_sink_and_source_key_is_documented() {
    let config = read("src/config.rs");
    let stdout = read("src/sink/stdout.rs");
    let stdin = read("src/source/stdin.rs");

    let mut sink_keys = quoted_after(&config, "\"sink\",");
    sink_keys.extend(struct_fields(&stdout, "StdoutConfig"));
    // Each sink's own keys: the fields of its `<Name>Keys` struct.
    for (file, keys) in [
        ("src/sink/redis.rs", "RedisKeys"),
        ("src/sink/pg_inbox.rs", "PgInboxKeys"),
        ("src/sink/http.rs", "HttpKeys"),
        ("src/sink/nats.rs", "NatsKeys"),
    ] {
        sink_keys.extend(struct_fields(&read(file), keys));
    }
    let mut source_keys = quoted_after(&config, "\"source\",");
    source_keys.extend(struct_fields(&stdin, "StdinConfig"));
    source_keys.extend(struct_fields(
        &read("src/source/http.rs"),
        "HttpSourceConfig",
    ));
    source_keys.extend(struct_fields(
        &read("src/source/redis.rs"),
        "RedisSourceConfig",
    ));
    source_keys.extend(struct_fields(
        &read("src/source/pg_outbox.rs"),
        "PgOutboxSourceConfig",
    ));
    for k in [
        "type",
        "subject",
        "batch_size",
        "format",
        "path",
        "rotate_bytes",
        "url",
        "stream",
        "maxlen",
        "inbox",
        "schema",
        "mode",
        "headers",
        "timeout_ms",
        "signing_secret",
        "credentials",
        "create_stream",
        "subjects",
    ] {
        assert!(
            sink_keys.contains(k),
            "sink key {k} not parsed: {sink_keys:?}"
        );
    }
    for k in [
        "type",
        "batch_size",
        "max_wait_ms",
        "path",
        "listen",
        "token",
        "max_body_bytes",
        "id_field",
        "group",
        "consumer",
        "claim_idle_ms",
        "start",
        "outbox",
    ] {
        assert!(
            source_keys.contains(k),
            "source key {k} not parsed: {source_keys:?}"
        );
    }
    let formats = enum_variants(&stdout, "Format");
    assert_eq!(formats, ["jsonl", "json_pretty", "csv"]);

    let (man, readme) = (man_text(), readme());
    for k in sink_keys.iter().chain(&source_keys).chain(&formats) {
        assert!(
            has_word(&man, k),
            "man/pgtrickle-relay.1 does not document key {k}"
        );
        assert!(has_word(&readme, k), "README.md does not document key {k}");
    }
    // The CloudEvents keys every CloudEvents sink takes out of its keys.
    let cloudevents = read("src/cloudevents.rs");
    for k in [
        "format",
        "cloudevents_mode",
        "cloudevents_source",
        "cloudevents_type",
        "cloudevents_subject",
    ] {
        assert!(cloudevents.contains(&format!("\"{k}\"")), "{k} not parsed");
        assert!(
            has_word(&man, k),
            "man/pgtrickle-relay.1 does not document key {k}"
        );
        assert!(has_word(&readme, k), "README.md does not document key {k}");
    }
    // And the subject template variables.
    for v in ["{stream_table}", "{op}", "{outbox_id}", "{refresh_id}"] {
        assert!(read("src/event.rs").contains(&v[1..v.len() - 1]));
        assert!(man.contains(v) && readme.contains(v), "{v} undocumented");
    }
}

#[test]
fn every_exit_code_of_main_rs_is_in_the_man_page() {
    let src = read("src/main.rs");
    let mut codes: BTreeSet<String> = ["0".to_string()].into();
    for line in src.lines().filter(|l| l.starts_with("const EXIT_")) {
        let n = line.split('=').nth(1).unwrap().trim().trim_end_matches(';');
        codes.insert(n.to_string());
    }
    assert_eq!(codes, ["0", "1", "2"].map(String::from).into());
    let man = man_text();
    let section = &man[man.find(".SH EXIT STATUS").expect("no EXIT STATUS section")..];
    let section = &section[..section[1..].find(".SH").unwrap() + 1];
    for c in &codes {
        assert!(
            section.contains(&format!(".B {c}\n")),
            "EXIT STATUS does not describe {c}"
        );
    }
}

#[test]
fn missing_postgres_url_exits_2_naming_the_flag_and_the_variable() {
    let out = run(&mut relay());
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = text(&out.stderr);
    assert!(err.contains("--postgres-url"), "{err}");
    assert!(err.contains("PGTRICKLE_RELAY_POSTGRES_URL"), "{err}");
    assert!(out.stdout.is_empty());
}

#[test]
fn an_empty_url_variable_counts_as_unset() {
    let out = run(relay().env("PGTRICKLE_RELAY_POSTGRES_URL", ""));
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

#[test]
fn bad_log_format_exits_2() {
    let out = run(relay().args(["--log-format", "xml", "--postgres-url", "postgres://h/db"]));
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = text(&out.stderr);
    assert!(err.contains("--log-format") && err.contains("xml"), "{err}");

    let out = run(relay()
        .env("PGTRICKLE_RELAY_LOG_FORMAT", "yaml")
        .args(["--postgres-url", "postgres://h/db"]));
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

#[test]
fn bad_log_level_and_zero_batch_size_exit_2() {
    let out = run(relay().args(["--log-level", "loud", "--postgres-url", "postgres://h/db"]));
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(text(&out.stderr).contains("--log-level"));

    let out = run(relay().args(["--batch-size", "0", "--postgres-url", "postgres://h/db"]));
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(text(&out.stderr).contains("--batch-size"));

    let out = run(relay().args(["--batch-size", "many", "--postgres-url", "postgres://h/db"]));
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

#[test]
fn unknown_flag_exits_2() {
    let out = run(relay().args(["--no-such-flag", "--postgres-url", "postgres://h/db"]));
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(text(&out.stderr).contains("--no-such-flag"), "{out:?}");
    assert!(out.stdout.is_empty());
}

#[test]
fn version_prints_the_version() {
    let want = format!("pgtrickle-relay {}", env!("CARGO_PKG_VERSION"));
    for flag in ["--version", "-V"] {
        let out = run(relay().arg(flag));
        assert_eq!(out.status.code(), Some(0), "{flag}: {out:?}");
        assert_eq!(text(&out.stdout).trim(), want, "{flag}");
    }
    assert!(
        man_text().contains(env!("CARGO_PKG_VERSION")),
        "the man page names another version"
    );
}

#[test]
fn sql_prints_the_install_script_without_psql_meta_commands() {
    let out = run(relay().arg("sql"));
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let sql = text(&out.stdout);
    assert!(sql.contains("CREATE"), "no CREATE in:\n{sql}");
    for (n, line) in sql.lines().enumerate() {
        assert!(
            !line.trim_start().starts_with('\\'),
            "line {}: psql meta-command {line:?}",
            n + 1
        );
    }
    // It is every file of sql/ that install.sql includes, in full.
    let install = read("sql/install.sql");
    let files: Vec<&str> = install
        .lines()
        .filter_map(|l| l.strip_prefix("\\ir "))
        .map(str::trim)
        .collect();
    assert!(files.len() >= 4, "install.sql includes {files:?}");
    for f in files {
        assert!(
            sql.contains(&read(&format!("sql/{f}"))),
            "sql/{f} missing from `sql`"
        );
    }
    assert!(out.stderr.is_empty(), "{}", text(&out.stderr));
}

#[test]
fn unreachable_database_with_once_exits_1_and_masks_the_password() {
    let port = closed_port();
    let url = format!("postgres://u:secret@127.0.0.1:{port}/db");
    let out = run(relay().args(["--postgres-url", &url, "--once"]));
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = text(&out.stderr);
    assert!(!err.contains("secret"), "password in the log:\n{err}");
    assert!(err.contains(&format!("u:***@127.0.0.1:{port}")), "{err}");
    assert!(err.contains("ERROR"), "{err}");
    assert!(out.stdout.is_empty(), "stdout is for events only");
}

#[test]
fn url_from_the_environment_with_env_expansion() {
    let port = closed_port();
    let out = run(relay()
        .env(
            "PGTRICKLE_RELAY_POSTGRES_URL",
            format!("postgres://u:${{ENV:PGTR_CLI_TEST_PW}}@127.0.0.1:{port}/db"),
        )
        .env("PGTR_CLI_TEST_PW", "hunter2xyz")
        .arg("--once"));
    // Not 2: the URL was found and expanded; 1: nothing listens there.
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = text(&out.stderr);
    assert!(!err.contains("hunter2xyz"), "password in the log:\n{err}");
    assert!(!err.contains("${ENV:"), "not expanded:\n{err}");
    assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
}

#[test]
fn unset_env_reference_exits_2_naming_the_variable() {
    let out = run(relay().env_remove("PGTR_CLI_NEVER_SET").args([
        "--postgres-url",
        "postgres://u:${ENV:PGTR_CLI_NEVER_SET}@h/db",
    ]));
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(text(&out.stderr).contains("PGTR_CLI_NEVER_SET"), "{out:?}");
}

#[test]
fn json_logs_are_one_object_per_line_on_stderr() {
    let port = closed_port();
    let url = format!("postgres://u:secret@127.0.0.1:{port}/db");
    let out = run(relay().args(["--postgres-url", &url, "--once", "--log-format", "json"]));
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(out.stdout.is_empty(), "stdout is for events only");
    let err = text(&out.stderr);
    let lines: Vec<&str> = err.lines().collect();
    assert!(!lines.is_empty());
    for l in lines {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        for k in ["time", "level", "message"] {
            assert!(v.get(k).is_some(), "no {k} in {l}");
        }
    }
    assert!(err.contains("\"level\":\"error\""), "{err}");
    assert!(!err.contains("secret"));
}

#[test]
fn install_sh_puts_every_file_under_the_prefix() {
    let root = std::env::temp_dir().join(format!("pgtr-install-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let manifest = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(manifest.join("install.sh"))
        .args(["--prefix", "/opt/relay", "--destdir"])
        .arg(&root)
        .arg("--binary")
        .arg(env!("CARGO_BIN_EXE_pgtrickle-relay"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let base = root.join("opt/relay");
    for f in [
        "bin/pgtrickle-relay",
        "share/man/man1/pgtrickle-relay.1",
        "share/pgtrickle-relay/sql/00_catalog.sql",
        "share/pgtrickle-relay/sql/30_inbox.sql",
        "lib/systemd/system/pgtrickle-relay.service",
    ] {
        assert!(base.join(f).is_file(), "missing {f}");
    }
    let unit =
        std::fs::read_to_string(base.join("lib/systemd/system/pgtrickle-relay.service")).unwrap();
    assert!(
        unit.contains("ExecStart=/opt/relay/bin/pgtrickle-relay"),
        "{unit}"
    );
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn the_homebrew_formula_installs_with_install_sh_and_tests_what_the_binary_prints() {
    let formula = read("dist/homebrew/Formula/pgtrickle-relay.rb");
    let cargo = read("Cargo.toml");
    let version = cargo
        .lines()
        .find_map(|l| l.strip_prefix("version = \""))
        .and_then(|v| v.strip_suffix('"'))
        .expect("version in Cargo.toml");
    assert!(
        formula.contains(&format!("/v{version}.tar.gz")),
        "the formula's url names another version than Cargo.toml's {version}"
    );
    // The same install steps as `make install`: install.sh with a prefix.
    assert!(formula.contains(r#"system "./install.sh", "--prefix", prefix"#));
    assert!(read("Makefile").contains("./install.sh --prefix"));
    // Every cargo feature it asks for exists.
    let features = quoted_after(&formula, r#""--features","#);
    assert!(features.contains("vendored-openssl"), "{features:?}");
    for feature in features {
        assert!(
            cargo.contains(&format!("\n{feature} = [")),
            "the formula builds with feature {feature:?}, which Cargo.toml lacks"
        );
    }
    // What its `test do` block expects is what the binary prints.
    let sql = text(&run(relay().arg("sql")).stdout);
    for expected in quoted_after(&formula, "assert_match \"") {
        if !expected.contains('#') {
            assert!(
                sql.contains(&expected),
                "`pgtrickle-relay sql` does not print {expected:?}"
            );
        }
    }
    assert!(formula.contains("assert_match \"CREATE SCHEMA IF NOT EXISTS pgtrickle\""));
}
