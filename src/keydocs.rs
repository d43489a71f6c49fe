//! The config keys' docs, made from and checked against the key specs
//! ([`KeySpec`]): the `KEYS` of every sink and source of the registries,
//! and the keys every sink or source has ([`sink::COMMON_KEYS`],
//! [`source::COMMON_KEYS`]). Tests only; `cargo test --lib keydocs` runs
//! them without any server.
//!
//! - The specs agree with the parsers: every key of a spec is taken by its
//!   parser with a value of its kind, its documented default is a value the
//!   parser takes, and every key the parser takes has a spec. A documented
//!   default given explicitly must parse to the config the key left out
//!   gives (the `Debug` of both compared), unless the parser keeps the key
//!   as given (`None` against `Some(default)`: then it cannot tell).
//! - README.md's key tables are generated from the specs, between
//!   `<!-- keys NAME -->` and `<!-- /keys -->` (NAME is `sink`, `source`,
//!   `sink:<type>` or `source:<type>`). A table that differs fails the
//!   test; with `UPDATE_DOCS=1` the test rewrites README.md instead.
//! - The man page's entries (`.TP` under `.SS <type>` of SINKS and
//!   SOURCES) are written by hand, in roff: the test checks that each
//!   section has an entry for exactly the keys of its spec, and that an
//!   entry states its default value and whether it is required.

use serde_json::{json, Map, Value};

use crate::keys::{ConfigError, Fallback, KeySpec, Plugin};
use crate::{sink, source};

/// The rows of a registry but aliases (`pg-outbox` for `postgres`: the
/// same keys), as (type, keys).
fn distinct(
    registry: Vec<(&'static str, &'static [KeySpec])>,
) -> Vec<(&'static str, &'static [KeySpec])> {
    let mut out: Vec<(&'static str, &'static [KeySpec])> = Vec::new();
    for (name, keys) in registry {
        if !out.iter().any(|(_, k)| *k == keys) {
            out.push((name, keys));
        }
    }
    out
}

/// A value of `kind`, for a key given in a test config.
fn sample(kind: &str) -> Value {
    match kind {
        // An https URL: what the `sqs` keys check before the others.
        "string" => json!("https://h.example/q"),
        "template" => json!("t.{op}"),
        "integer" => json!(5),
        "boolean" => json!(true),
        "object" => json!({}),
        "list of strings" => json!(["x"]),
        "string or list of strings" => json!("h:9092"),
        "origin" => json!({"field": "f"}),
        other => panic!(
            "key kind {other:?} is unknown to src/keydocs.rs: use a kind listed in `sample` there, \
             or add it with a value of that kind"
        ),
    }
}

/// The value a documented default stands for, in a config.
fn default_value(spec: &KeySpec, v: &str) -> Value {
    match spec.kind {
        "integer" | "boolean" => serde_json::from_str(v).unwrap_or_else(|e| {
            panic!(
                "key `{}`: default {v:?} is not a {}: {e}",
                spec.name, spec.kind
            )
        }),
        _ => json!(v),
    }
}

/// The required keys of `keys`, each with a value of its kind.
fn required(keys: &[KeySpec]) -> Map<String, Value> {
    keys.iter()
        .filter(|k| k.default == Fallback::Required)
        .map(|k| (k.name.to_string(), sample(k.kind)))
        .collect()
}

/// Values a test tries for a string key its parser refuses (the first is
/// [`sample`]'s): URLs of each scheme a plugin takes, an address, a plain
/// name.
const CANDIDATES: &[&str] = &[
    "https://h.example/q",
    "redis://h.example",
    "amqp://h.example",
    "postgres://h.example/db",
    "127.0.0.1:0",
    "S",
];

/// A config that `parse` accepts, made of the required keys of `keys` (and
/// any key an error asks for), each with a value of its kind, the string
/// values tried from [`CANDIDATES`] until the parser takes them.
fn minimal<T>(
    side: &str,
    keys: &[KeySpec],
    parse: impl Fn(Map<String, Value>) -> Result<T, ConfigError>,
) -> Result<(Map<String, Value>, T), ConfigError> {
    let mut config = required(keys);
    let mut tried: Vec<(String, usize)> = Vec::new();
    loop {
        let e = match parse(config.clone()) {
            Ok(t) => return Ok((config, t)),
            Err(e) => e,
        };
        let name = e.key.strip_prefix(&format!("{side}.")).unwrap_or("");
        let Some(spec) = keys.iter().find(|k| k.name == name) else {
            return Err(e);
        };
        let n = match tried.iter_mut().find(|(k, _)| k == name) {
            Some((_, n)) => {
                *n += 1;
                *n
            }
            None => {
                tried.push((name.to_string(), 0));
                0
            }
        };
        let value = match (spec.kind, config.contains_key(name)) {
            (_, false) => sample(spec.kind),
            // The first candidate is the sample, given already.
            ("string", true) if n + 1 < CANDIDATES.len() => json!(CANDIDATES[n + 1]),
            _ => return Err(e),
        };
        config.insert(name.to_string(), value);
    }
}

/// Whether two `Debug` texts of a parsed config are the same but where the
/// first holds `None` and the second `Some(...)`: a parser that keeps a
/// key as given and applies its default later.
fn same_but_optional(without: &str, with: &str) -> bool {
    let i = without
        .char_indices()
        .zip(with.chars())
        .find(|((_, a), b)| a != b)
        .map_or(without.len().min(with.len()), |((i, _), _)| i);
    if !with.is_char_boundary(i) {
        return false;
    }
    let (Some(a), Some(b)) = (
        without[i..].strip_prefix("None"),
        with[i..].strip_prefix("Some("),
    ) else {
        return false;
    };
    let mut depth = 1;
    let Some(end) = b.char_indices().find_map(|(j, c)| {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            _ => {}
        }
        (depth == 0).then_some(j)
    }) else {
        return false;
    };
    a == &b[end + 1..]
}

/// Whether `e` says that the parser has no key `name`, or does not take a
/// value of that kind for it.
fn refuses_key(e: &ConfigError, side: &str, name: &str) -> bool {
    e.msg.contains(&format!("unknown field `{name}`"))
        || (e.key == format!("{side}.{name}") && e.msg.starts_with("invalid type"))
}

/// The names an "unknown field" error of serde lists as expected.
fn expected_fields(msg: &str) -> Vec<String> {
    match msg.split_once(", expected ") {
        Some((_, list)) => list
            .split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_string)
            .collect(),
        None => Vec::new(),
    }
}

/// Check one plugin's specs against its parser (called without
/// [`crate::keys::known`], so serde's own view of the keys shows).
fn check_plugin<P: Copy, T: std::fmt::Debug>(
    side: &str,
    p: &Plugin<P>,
    parse: impl Fn(P, Map<String, Value>) -> Result<T, ConfigError>,
) -> Vec<String> {
    let mut problems = Vec::new();
    let at = format!("{side} `{}`", p.name);
    let base = minimal(side, p.keys, |k| parse(p.parse, k));
    if let Err(e) = &base {
        problems.push(format!(
            "{at}: no config of its required keys is accepted ({e}): add a value it \
             takes to CANDIDATES in src/keydocs.rs"
        ));
    }
    for (i, k) in p.keys.iter().enumerate() {
        if p.keys[..i].iter().any(|o| o.name == k.name) {
            problems.push(format!("{at}: key `{}` has two rows in its KEYS", k.name));
        }
        for text in [k.kind, k.doc] {
            if text.is_empty() || text.contains(['|', '\n']) {
                problems.push(format!(
                    "{at}: key `{}`: kind and doc must be one line, not empty, without `|`",
                    k.name
                ));
            }
        }
        let mut keys = required(p.keys);
        keys.insert(k.name.to_string(), sample(k.kind));
        if let Err(e) = parse(p.parse, keys) {
            if refuses_key(&e, side, k.name) {
                problems.push(format!(
                    "{at}: KEYS has `{}` ({}), which the parser refuses: {e}. \
                     Fix the row's name or kind, or the parser",
                    k.name, k.kind
                ));
            }
        }
        if let (Fallback::Value(v), Ok((min, parsed))) = (k.default, &base) {
            // The default given: the same config, or the same but where
            // the parser keeps what was given (`None` / `Some`).
            let mut keys = min.clone();
            keys.insert(k.name.to_string(), default_value(k, v));
            if let Ok(with) = parse(p.parse, keys) {
                let (without, with) = (format!("{parsed:?}"), format!("{with:?}"));
                if without != with && !same_but_optional(&without, &with) {
                    problems.push(format!(
                        "{at}: `{}` given as its documented default `{v}` parses to another \
                         config than `{}` left out:\n  left out: {without}\n  given:    {with}",
                        k.name, k.name
                    ));
                }
            }
        }
        if let Fallback::Value(v) = k.default {
            let mut keys = required(p.keys);
            keys.insert(k.name.to_string(), default_value(k, v));
            if let Err(e) = parse(p.parse, keys) {
                // A value the parser refuses; a rule between keys (this
                // one needs that one) is no concern of the default.
                let refused = [
                    "invalid type",
                    "invalid value",
                    "unknown variant",
                    "must be",
                ]
                .iter()
                .any(|m| e.msg.starts_with(m) || e.msg.contains(&format!(": {m}")));
                if e.key == format!("{side}.{}", k.name) && refused {
                    problems.push(format!(
                        "{at}: the documented default `{v}` of `{}` is refused by the parser: {e}",
                        k.name
                    ));
                }
            }
        }
    }
    let mut keys = required(p.keys);
    keys.insert("zz_no_such_key".into(), json!(1));
    match parse(p.parse, keys) {
        Ok(_) => problems.push(format!("{at}: the parser takes an unknown key")),
        Err(e) if !e.msg.contains("unknown field `zz_no_such_key`") => problems.push(format!(
            "{at}: with its required keys and an unknown key the parser should refuse the \
             unknown key, but says: {e}"
        )),
        Err(e) => {
            for f in expected_fields(&e.msg) {
                if !p.keys.iter().any(|k| k.name == f) {
                    problems.push(format!(
                        "{at}: the parser takes key `{f}`, which its KEYS lack: add \
                         KeySpec::new(\"{f}\", <kind>, <Fallback>, \"<one-line doc>\") to its \
                         KEYS, then run `UPDATE_DOCS=1 cargo test --lib keydocs` and document \
                         it in man/pgtrickle-relay.1"
                    ));
                }
            }
        }
    }
    problems
}

#[test]
fn every_spec_agrees_with_its_parser() {
    let mut problems = Vec::new();
    for p in sink::REGISTRY {
        problems.extend(check_plugin("sink", p, |f, k| f(k)));
    }
    for p in source::REGISTRY {
        problems.extend(check_plugin("source", p, |f, k| f(k)));
    }
    // The `sqs` sink and source take the connection keys before serde sees
    // the rest, so the check above cannot list them: compare by name.
    #[cfg(feature = "sqs")]
    for (side, keys) in [("sink", sink::sqs::KEYS), ("source", source::sqs::KEYS)] {
        for name in crate::broker::sqs::CONN_KEYS {
            if !keys.iter().any(|k| k.name == *name) {
                problems.push(format!(
                    "{side} `sqs`: the connection key `{name}` (CONN_KEYS of \
                     src/broker/sqs.rs) has no row in its KEYS"
                ));
            }
        }
    }
    // The `type` key's doc names every type (but aliases).
    let sinks = sink::REGISTRY.iter().map(|p| (p.name, p.keys)).collect();
    let sources = source::REGISTRY.iter().map(|p| (p.name, p.keys)).collect();
    for (side, common, registry) in [
        ("sink", sink::COMMON_KEYS, distinct(sinks)),
        ("source", source::COMMON_KEYS, distinct(sources)),
    ] {
        let doc = common
            .iter()
            .find(|k| k.name == "type")
            .map_or("", |k| k.doc);
        for (name, _) in registry {
            if !doc.contains(&format!("`{name}`")) {
                problems.push(format!(
                    "the doc of `type` in COMMON_KEYS of src/{side}/mod.rs does not name the \
                     {side} `{name}`"
                ));
            }
        }
    }
    assert!(problems.is_empty(), "\n{}", problems.join("\n"));
}

#[test]
fn the_keys_every_sink_and_source_has_are_parsed_with_their_defaults() {
    use crate::config::{parse, CatalogEntry, Pipeline};
    use crate::pipeline::Direction;
    let entry = |direction, config| CatalogEntry {
        name: "p".into(),
        direction,
        enabled: true,
        config,
    };
    let forward = |sink: Value| {
        entry(
            Direction::Forward,
            json!({"source": {"outbox": "o"}, "sink": sink}),
        )
    };
    let reverse = |source: Value| {
        entry(
            Direction::Reverse,
            json!({"source": source, "sink": {"inbox": "i"}}),
        )
    };
    let mut all = json!({"type": "stdout"});
    for k in sink::COMMON_KEYS.iter().filter(|k| k.name != "type") {
        all[k.name] = sample(k.kind);
    }
    parse(&forward(all), 7).expect("every key of sink::COMMON_KEYS, with a value of its kind");
    let mut all = json!({"type": "stdin"});
    for k in source::COMMON_KEYS.iter().filter(|k| k.name != "type") {
        all[k.name] = sample(k.kind);
    }
    parse(&reverse(all), 7).expect("every key of source::COMMON_KEYS, with a value of its kind");

    // The defaults stated as values are the ones the parser takes.
    let given = |keys: &[KeySpec], name: &str| match keys.iter().find(|k| k.name == name) {
        Some(KeySpec {
            default: Fallback::Value(v),
            ..
        }) => v.to_string(),
        other => panic!("{name}: {other:?}"),
    };
    let Pipeline::Forward(f) = parse(&forward(json!({"type": "stdout"})), 7).unwrap() else {
        panic!()
    };
    let subject = crate::event::Template::parse(&given(sink::COMMON_KEYS, "subject")).unwrap();
    assert_eq!(format!("{:?}", f.subject), format!("{subject:?}"));
    assert_eq!(
        f.lease.as_secs().to_string(),
        given(sink::COMMON_KEYS, "lease_seconds")
    );
    let Pipeline::Reverse(r) = parse(&reverse(json!({"type": "stdin"})), 7).unwrap() else {
        panic!()
    };
    assert_eq!(
        r.max_wait.as_millis().to_string(),
        given(source::COMMON_KEYS, "max_wait_ms")
    );
    // A key the specs lack is refused.
    let e = parse(&forward(json!({"type": "stdout", "zz": 1})), 7).unwrap_err();
    assert_eq!(e.key, "sink.zz");
    let e = parse(&reverse(json!({"type": "stdin", "zz": 1})), 7).unwrap_err();
    assert_eq!(e.key, "source.zz");
}

#[test]
fn a_key_without_a_spec_is_refused_naming_it_and_the_keys_there_are() {
    let e = sink::parse("stdout", Map::from_iter([("pth".into(), json!("x"))])).unwrap_err();
    assert_eq!(e.key, "sink.pth");
    assert_eq!(
        e.msg,
        "unknown field `pth`, expected one of `type`, `subject`, `batch_size`, `lease_seconds`, \
         `format`, `path`, `rotate_bytes`"
    );
    let e = source::parse("stdin", Map::from_iter([("x".into(), json!(1))])).unwrap_err();
    assert_eq!(
        e.msg,
        "unknown field `x`, expected one of `type`, `batch_size`, `max_wait_ms`, `path`"
    );
}

/// The docs, made from the specs or checked against them: with every
/// feature only, as README.md and the man page describe every sink and
/// source.
#[cfg(all(
    feature = "redis",
    feature = "pg-inbox",
    feature = "http",
    feature = "nats",
    feature = "kafka",
    feature = "rabbitmq",
    feature = "sqs"
))]
mod docs {
    use super::*;

    /// One key table: its marker name and where its keys are written.
    struct Table {
        /// `sink`, `source`, `sink:<type>`, `source:<type>`, or the name of
        /// keys some sinks share (`cloudevents`).
        name: String,
        /// Where a fix goes, for messages.
        home: String,
        /// Its keys.
        keys: &'static [KeySpec],
    }

    /// Every key table, in the order the docs show them.
    fn tables() -> Vec<Table> {
        let mut out = vec![Table {
            name: "sink".into(),
            home: "COMMON_KEYS in src/sink/mod.rs".into(),
            keys: sink::COMMON_KEYS,
        }];
        let plugins = |side: &'static str, registry: Vec<(&'static str, &'static [KeySpec])>| {
            distinct(registry)
                .into_iter()
                .map(move |(name, keys)| Table {
                    name: format!("{side}:{name}"),
                    home: format!(
                        "KEYS of the {side} `{name}` (its file is named in src/{side}/mod.rs)"
                    ),
                    keys,
                })
        };
        out.extend(plugins(
            "sink",
            sink::REGISTRY.iter().map(|p| (p.name, p.keys)).collect(),
        ));
        out.push(Table {
            name: "cloudevents".into(),
            home: "KEYS in src/cloudevents.rs".into(),
            keys: crate::cloudevents::KEYS,
        });
        out.push(Table {
            name: "source".into(),
            home: "COMMON_KEYS in src/source/mod.rs".into(),
            keys: source::COMMON_KEYS,
        });
        out.extend(plugins(
            "source",
            source::REGISTRY.iter().map(|p| (p.name, p.keys)).collect(),
        ));
        out
    }

    /// The Markdown of one key table.
    fn markdown(keys: &[KeySpec]) -> String {
        let mut out = String::from("| key | type | default | meaning |\n|---|---|---|---|\n");
        let mut i = 0;
        while i < keys.len() {
            // Keys that differ only in name share a row.
            let k = &keys[i];
            let mut names = vec![format!("`{}`", k.name)];
            i += 1;
            while i < keys.len()
                && (keys[i].kind, keys[i].default, keys[i].doc) == (k.kind, k.default, k.doc)
            {
                names.push(format!("`{}`", keys[i].name));
                i += 1;
            }
            let default = match k.default {
                Fallback::Required => "required".to_string(),
                Fallback::Unset => "—".to_string(),
                Fallback::Value(v) => format!("`{v}`"),
                Fallback::Text(t) => t.to_string(),
            };
            out.push_str(&format!(
                "| {} | {} | {default} | {} |\n",
                names.join(", "),
                k.kind,
                k.doc
            ));
        }
        out
    }

    fn root() -> std::path::PathBuf {
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
    }

    /// `text` with every `<!-- keys NAME -->` ... `<!-- /keys -->` block
    /// filled with its table; an error names a block without a table, a
    /// table without a block, or a block that is not closed.
    fn fill(text: &str, tables: &[Table]) -> Result<String, String> {
        let mut out = String::new();
        let mut rest = text;
        let mut done = Vec::new();
        while let Some(i) = rest.find("<!-- keys ") {
            let open_end = rest[i..].find("-->").ok_or("unclosed marker comment")? + i + 3;
            let name = rest[i + "<!-- keys ".len()..open_end - 3].trim();
            let close = rest[open_end..]
                .find("<!-- /keys -->")
                .ok_or(format!("`<!-- keys {name} -->` has no `<!-- /keys -->`"))?
                + open_end;
            let table = tables
                .iter()
                .find(|t| t.name == name)
                .ok_or(format!("`<!-- keys {name} -->`: no such key table"))?;
            out.push_str(&rest[..open_end]);
            out.push('\n');
            out.push_str(&markdown(table.keys));
            done.push(name.to_string());
            rest = &rest[close..];
        }
        out.push_str(rest);
        for t in tables {
            match done.iter().filter(|d| **d == t.name).count() {
                1 => {}
                0 => {
                    return Err(format!(
                        "README.md has no `<!-- keys {} -->` block for the {}: put \
                         `<!-- keys {0} -->` and `<!-- /keys -->` where its table goes",
                        t.name, t.home
                    ))
                }
                _ => return Err(format!("README.md has `<!-- keys {} -->` twice", t.name)),
            }
        }
        Ok(out)
    }

    #[test]
    fn readme_key_tables_are_the_specs() {
        let path = root().join("README.md");
        let text = std::fs::read_to_string(&path).unwrap();
        let filled = fill(&text, &tables()).unwrap_or_else(|e| panic!("{e}"));
        if filled == text {
            return;
        }
        if std::env::var_os("UPDATE_DOCS").is_some() {
            std::fs::write(&path, filled).unwrap();
            return;
        }
        let (old, new): (Vec<_>, Vec<_>) = (text.lines().collect(), filled.lines().collect());
        let line = old
            .iter()
            .zip(&new)
            .position(|(a, b)| a != b)
            .unwrap_or(old.len().min(new.len()));
        panic!(
            "README.md's key tables differ from the key specs from line {}:\n  README: {}\n  specs:  {}\n\
             Edit the specs (the KEYS of the sink or source), not the tables, then run \
             `UPDATE_DOCS=1 cargo test --lib keydocs`",
            line + 1,
            old.get(line).unwrap_or(&""),
            new.get(line).unwrap_or(&"")
        );
    }

    /// The man page's text of `.SS name` under `.SH head`, up to the next
    /// section (`name` `None`: the text before the first `.SS`).
    fn man_section<'a>(man: &'a str, head: &str, name: Option<&str>) -> Option<&'a str> {
        let start = man.find(&format!("\n.SH {head}\n"))? + 1;
        let body = &man[start..];
        let end = body[1..].find("\n.SH ").map_or(body.len(), |i| i + 1);
        let body = &body[..end];
        match name {
            None => Some(&body[..body.find("\n.SS ").map_or(body.len(), |i| i + 1)]),
            Some(n) => {
                let ss = format!("\n.SS {}\n", n.replace('-', "\\-"));
                let s = body
                    .find(&ss)
                    .or_else(|| body.find(&format!("\n.SS {n}\n")))?
                    + 1;
                let sec = &body[s..];
                Some(&sec[..sec[1..].find("\n.SS ").map_or(sec.len(), |i| i + 1)])
            }
        }
    }

    /// Roff with its escapes and font changes undone.
    fn plain(roff: &str) -> String {
        let mut s = roff
            .replace("\\-", "-")
            .replace("\\&", "")
            .replace("\\(aq", "'")
            .replace("\\(dq", "\"")
            .replace("\\e", "\\");
        for f in ["\\fB", "\\fI", "\\fR", "\\fP"] {
            s = s.replace(f, "");
        }
        s.lines()
            .map(|l| {
                let l = [".BR ", ".BI ", ".IB ", ".RB ", ".I ", ".B "]
                    .iter()
                    .find_map(|m| l.strip_prefix(m))
                    .map(|r| r.replace('"', ""))
                    .unwrap_or_else(|| l.to_string());
                l
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The entries of a man page section: the key names of each `.TP` tag
    /// (outside `.RS`/`.RE`) and the entry's text.
    fn man_entries(section: &str) -> Vec<(Vec<String>, String)> {
        let mut out: Vec<(Vec<String>, String)> = Vec::new();
        let mut lines = section.lines();
        let mut depth = 0;
        let mut current: Option<usize> = None;
        while let Some(l) = lines.next() {
            if l.starts_with(".RS") {
                depth += 1;
            } else if l.starts_with(".RE") {
                depth -= 1;
            } else if depth == 0 && l == ".TP" {
                let tag = plain(lines.next().unwrap_or(""));
                let names = tag
                    .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .filter(|w| !w.is_empty() && *w != "or")
                    .map(str::to_string)
                    .collect();
                out.push((names, String::new()));
                current = Some(out.len() - 1);
                continue;
            } else if depth == 0 && (l.starts_with(".PP") || l.starts_with(".SS")) {
                current = None;
            }
            if let Some(c) = current {
                out[c].1.push_str(l);
                out[c].1.push('\n');
            }
        }
        out
    }

    #[test]
    fn the_man_page_documents_every_key_with_its_default() {
        let man = std::fs::read_to_string(root().join("man/pgtrickle-relay.1")).unwrap();
        let mut problems = Vec::new();
        let tables = tables();
        // Where a table's keys are described: the keys every sink (source)
        // has and those some sinks share before the first `.SS` of SINKS
        // (SOURCES), a plugin's under its own `.SS`.
        let home_of = |t: &Table| {
            let (side, name) = t
                .name
                .split_once(':')
                .map_or((t.name.as_str(), None), |(s, n)| (s, Some(n)));
            let head = if side == "source" { "SOURCES" } else { "SINKS" };
            (head, name.map(str::to_string))
        };
        for t in &tables {
            let (head, name) = home_of(t);
            let name = name.as_deref();
            let Some(section) = man_section(&man, head, name) else {
                problems.push(format!(
                    "the man page has no `.SS {}` under `.SH {head}`",
                    name.unwrap_or("")
                ));
                continue;
            };
            let entries = man_entries(section);
            if let Some(n) = name {
                let common = man_section(&man, head, None).unwrap_or("");
                let types = man_entries(common)
                    .into_iter()
                    .find(|(names, _)| names.iter().any(|n| n == "type"))
                    .map(|(_, text)| plain(&text))
                    .unwrap_or_default();
                if !types.lines().any(|l| l.split([' ', ',']).any(|w| w == n)) {
                    problems.push(format!(
                        "man page, {head}: the entry of `type` does not name `{n}`"
                    ));
                }
            }
            let documented: Vec<&String> = entries.iter().flat_map(|(n, _)| n).collect();
            let place = format!("man page, {head} {}", name.unwrap_or("(keys of every one)"));
            for k in t.keys {
                let Some((_, text)) = entries.iter().find(|(n, _)| n.iter().any(|n| n == k.name))
                else {
                    problems.push(format!("{place}: no `.TP` entry for key `{}`", k.name));
                    continue;
                };
                let text = plain(text);
                match k.default {
                    Fallback::Required if !text.to_lowercase().contains("required") => {
                        problems.push(format!("{place}: `{}` does not say it is required", k.name))
                    }
                    Fallback::Value(v) if !text.contains(v) => problems.push(format!(
                        "{place}: `{}` does not state its default {v}",
                        k.name
                    )),
                    _ => {}
                }
            }
            let shared: Vec<&Table> = tables
                .iter()
                .filter(|o| home_of(o) == (head, name.map(str::to_string)))
                .collect();
            for d in documented {
                if !shared
                    .iter()
                    .any(|o| o.keys.iter().any(|k| k.name == d.as_str()))
                {
                    problems.push(format!("{place}: entry `{d}` is no key of {}", t.home));
                }
            }
        }
        assert!(problems.is_empty(), "\n{}", problems.join("\n"));
    }
}
