//! pgtrickle-relay: moves events between PostgreSQL outbox/inbox tables and
//! message brokers, reliably. The binary (src/main.rs) turns flags into one
//! call per mode: [`run`], [`status`], [`replay`], [`check`], [`sql`] and
//! [`probe`]. How the parts
//! fit together, and where each rule lives: docs/ARCHITECTURE.md.

mod broker;
mod check;
mod cloudevents;
mod config;
mod coordinator;
mod endpoints;
mod error;
mod event;
mod forward;
mod health;
mod inbox;
#[cfg(test)]
mod keydocs;
mod keys;
mod listen;
mod logging;
mod metrics;
mod outbox;
mod pg;
mod pipeline;
mod redact;
mod replay;
mod retry;
mod reverse;
mod shutdown;
#[cfg(feature = "http")]
mod signing;
mod sink;
mod source;
mod sql;
mod status;
#[cfg(test)]
mod testkit;
mod trace;
mod wake;

pub use coordinator::{Exit, Settings};
pub use error::Error;
pub use logging::{init as init_logging, Format as LogFormat};
pub use pg::expand_env;
pub use redact::secrets as redact_secrets;
pub use replay::Request as ReplayRequest;

/// `pgtrickle-relay`: run every wanted pipeline until SIGTERM or SIGINT
/// (SIGHUP re-reads the catalog), or with `--once` until each drained;
/// serve `/metrics` and `/health` on `settings.metrics_addr` meanwhile.
pub fn run(settings: &Settings) -> Exit {
    let signals = match shutdown::Signals::install() {
        Ok(s) => s,
        Err(e) => {
            log::error!("installing signal handlers: {e}");
            return Exit::Failure;
        }
    };
    log::info!(
        "pgtrickle-relay {} connecting to {}",
        env!("CARGO_PKG_VERSION"),
        pg::mask(&settings.postgres_url)
    );
    if let Some(addr) = &settings.metrics_addr {
        match endpoints::serve(addr, settings.stall_timeout) {
            Ok(bound) => log::info!("serving /metrics and /health on http://{bound}"),
            Err(e) => {
                log::error!("{e} (--metrics-addr; \"off\" disables it)");
                return Exit::Failure;
            }
        }
    }
    coordinator::run(settings, &signals)
}

/// `pgtrickle-relay status`: every pipeline of `relay_group` with its
/// owner, position, pending events, lag and dead letters, read from
/// PostgreSQL only; as pretty JSON, or as an aligned table.
pub fn status(postgres_url: &str, relay_group: &str, json: bool) -> Result<String, Error> {
    let mut client = pg::connect(postgres_url, "pgtrickle-relay status")?;
    let v = status::collect(&mut client, relay_group)?;
    Ok(if json {
        format!("{v:#}\n")
    } else {
        status::table(&v)
    })
}

/// `pgtrickle-relay replay`: re-publish a range of a forward pipeline's
/// outbox through its sink with the original dedup keys, leaving every
/// position unchanged (or, with `dry_run`, count what would be sent); the
/// report to print.
pub fn replay(postgres_url: &str, req: &ReplayRequest) -> Result<String, Error> {
    let mut client = pg::connect(postgres_url, "pgtrickle-relay replay")?;
    replay::run(&mut client, req)
}

/// `pgtrickle-relay check`: validate the config of the pipelines named in
/// `only` (all when empty) and, with `connect`, reach what each uses. The
/// report to print (one line per problem and per fine pipeline, or JSON)
/// and whether everything was fine.
pub fn check(
    postgres_url: &str,
    only: &[String],
    connect: bool,
    json: bool,
    default_batch: usize,
) -> Result<(String, bool), Error> {
    let mut client = pg::connect(postgres_url, "pgtrickle-relay check")?;
    let reports = check::run(&mut client, only, connect, default_batch)?;
    let ok = reports.iter().all(|r| r.problems.is_empty());
    let text = if json {
        format!("{:#}\n", check::json(&reports))
    } else {
        check::text(&reports)
    };
    Ok((text, ok))
}

/// `pgtrickle-relay sql`: the SQL that installs the relay catalog and the
/// outbox/inbox kit.
pub fn sql() -> String {
    sql::script()
}

/// `pgtrickle-relay probe`: Ok when the relay serving on `addr` answers
/// that it is alive (`/livez`), or with `ready`, ready (`/readyz`).
pub fn probe(addr: &str, ready: bool) -> Result<(), Error> {
    endpoints::probe(addr, if ready { "/readyz" } else { "/livez" })
}

/// This process as relay groups and consumer groups know it: `host:pid`.
pub fn worker_id() -> String {
    format!("{}:{}", hostname(), std::process::id())
}

/// The host's name (else `$HOSTNAME`, else `localhost`): for the names
/// this process gives itself (its worker id, a Redis consumer's name).
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into())
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::path::Path;

    /// The modules each module of src/ names (`crate::x`), by top-level
    /// module; comments and `mod tests` left out.
    fn module_graph() -> BTreeMap<String, BTreeSet<String>> {
        fn walk(dir: &Path, root: &Path, graph: &mut BTreeMap<String, BTreeSet<String>>) {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    walk(&path, root, graph);
                    continue;
                }
                let rel = path
                    .strip_prefix(root)
                    .unwrap()
                    .to_string_lossy()
                    .to_string();
                let module = rel.split(['/', '.']).next().unwrap().to_string();
                if !rel.ends_with(".rs") || module == "lib" || module == "main" {
                    continue;
                }
                let text = std::fs::read_to_string(&path).unwrap();
                let code = text.split("#[cfg(test)]\nmod tests").next().unwrap();
                let deps = graph.entry(module.clone()).or_default();
                for line in code.lines().map(|l| l.split("//").next().unwrap()) {
                    // `crate::a::b`, and `use crate::{a, b::c}`.
                    let mut rest = line;
                    while let Some(i) = rest.find("crate::") {
                        rest = &rest[i + "crate::".len()..];
                        let names = match rest.strip_prefix('{') {
                            Some(group) => group.split('}').next().unwrap().split(',').collect(),
                            None => vec![rest],
                        };
                        for n in names {
                            let n: String = n
                                .trim()
                                .chars()
                                .take_while(|c| c.is_alphanumeric() || *c == '_')
                                .collect();
                            if !n.is_empty() && n != module {
                                deps.insert(n);
                            }
                        }
                    }
                }
            }
        }
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut graph = BTreeMap::new();
        walk(&root, &root, &mut graph);
        graph
    }

    #[test]
    fn no_module_depends_on_itself_through_others() {
        let graph = module_graph();
        assert!(graph["config"].contains("sink") && graph["forward"].contains("pipeline"));
        // Depth-first, keeping the path: a module met again on it is a cycle.
        fn visit<'a>(
            m: &'a str,
            graph: &'a BTreeMap<String, BTreeSet<String>>,
            path: &mut Vec<&'a str>,
            done: &mut BTreeSet<&'a str>,
        ) {
            if let Some(i) = path.iter().position(|p| *p == m) {
                panic!("module cycle: {} -> {m}", path[i..].join(" -> "));
            }
            if !done.insert(m) {
                return;
            }
            path.push(m);
            for d in graph.get(m).into_iter().flatten() {
                visit(d, graph, path, done);
            }
            path.pop();
        }
        let mut done = BTreeSet::new();
        for m in graph.keys() {
            visit(m, &graph, &mut Vec::new(), &mut done);
        }
    }
}
