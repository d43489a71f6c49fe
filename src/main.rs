//! pgtrickle-relay: moves events between PostgreSQL outbox/inbox tables and
//! message brokers. Flags are defined here, in one place; everything else
//! is configured in SQL.

#[cfg(feature = "rabbitmq")]
mod amqp;
mod config;
mod coordinator;
mod event;
mod forward;
mod health;
mod http;
mod inbox;
#[cfg(feature = "kafka")]
mod kafka;
mod logging;
mod metrics;
mod outbox;
mod pg;
mod pipeline;
mod redact;
mod retry;
mod reverse;
mod shutdown;
mod sink;
mod source;
mod sql;
#[cfg(feature = "sqs")]
mod sqs;
mod status;

use std::io::Write;
use std::time::Duration;

use argh::FromArgs;

/// Exit code: a `--once` run failed, or the relay could not start.
const EXIT_FAILURE: i32 = 1;
/// Exit code: bad flags or settings.
const EXIT_USAGE: i32 = 2;

#[derive(FromArgs)]
/// Relay events between PostgreSQL outbox/inbox tables and message brokers.
/// Pipelines are configured in SQL (pgtrickle.set_relay_outbox,
/// pgtrickle.set_relay_inbox) and picked up live. See pgtrickle-relay(1).
struct Flags {
    /// postgreSQL connection string (env PGTRICKLE_RELAY_POSTGRES_URL);
    /// ${ENV:NAME} is replaced from the environment
    #[argh(option)]
    postgres_url: Option<String>,

    /// log format: text or json (env PGTRICKLE_RELAY_LOG_FORMAT; default text)
    #[argh(option)]
    log_format: Option<String>,

    /// log level: error, warn, info, debug or trace (env
    /// PGTRICKLE_RELAY_LOG_LEVEL; default info)
    #[argh(option)]
    log_level: Option<String>,

    /// address for GET /metrics and /health (env PGTRICKLE_RELAY_METRICS_ADDR;
    /// default 0.0.0.0:9090; "off" disables; not served with --once)
    #[argh(option)]
    metrics_addr: Option<String>,

    /// seconds without progress, while events wait, after which a pipeline
    /// counts as stalled: /health answers 503 and the systemd watchdog
    /// stops (default 60)
    #[argh(option, default = "60")]
    stall_timeout_secs: u64,

    /// relay group: instances with the same id share pipelines, one owner
    /// each (env PGTRICKLE_RELAY_GROUP_ID; default "default")
    #[argh(option)]
    relay_group_id: Option<String>,

    /// deliver everything committed, then exit (0 when every pipeline drained)
    #[argh(switch)]
    once: bool,

    /// run only this pipeline (repeatable; default: every enabled pipeline)
    #[argh(option)]
    pipeline: Vec<String>,

    /// events per batch (forward: a read ends before the outbox row that
    /// would pass it) or messages per inbox transaction (reverse), unless
    /// the pipeline's config sets batch_size (default 5000)
    #[argh(option, default = "5000")]
    batch_size: usize,

    /// milliseconds to wait for a notification before reading anyway; a
    /// safety net, as notifications wake the relay at once (default 5000)
    #[argh(option, default = "5000")]
    poll_interval_ms: u64,

    /// seconds between full re-reads of the relay catalog (default 30)
    #[argh(option, default = "30")]
    discovery_interval_secs: u64,

    /// print the version and exit
    #[argh(switch, short = 'V')]
    version: bool,

    #[argh(subcommand)]
    command: Option<Command>,
}

#[derive(FromArgs)]
#[argh(subcommand)]
enum Command {
    Sql(SqlCommand),
    Status(StatusCommand),
    Probe(ProbeCommand),
}

#[derive(FromArgs)]
/// Ask a running relay on --metrics-addr (default 127.0.0.1:9090) whether it
/// is alive (GET /livez) or ready (GET /readyz); exit 0 if so, 1 if not.
/// For container HEALTHCHECKs and scripts.
#[argh(subcommand, name = "probe")]
struct ProbeCommand {
    /// ask /readyz instead of /livez
    #[argh(switch)]
    ready: bool,
}

#[derive(FromArgs)]
/// Print every pipeline: direction, enabled, owner instance, committed
/// position, pending events, lag and dead letters (reads PostgreSQL only).
#[argh(subcommand, name = "status")]
struct StatusCommand {
    /// print JSON instead of a table
    #[argh(switch)]
    json: bool,
}

#[derive(FromArgs)]
/// Print the SQL that installs the relay catalog and the outbox/inbox kit
/// (pipe it into psql).
#[argh(subcommand, name = "sql")]
struct SqlCommand {}

/// A flag, else its environment variable, else nothing.
fn flag_or_env(flag: Option<String>, env: &str) -> Option<String> {
    flag.or_else(|| std::env::var(env).ok().filter(|v| !v.is_empty()))
}

fn usage_error(msg: &str) -> ! {
    eprintln!(
        "pgtrickle-relay: {}\nRun pgtrickle-relay --help for usage.",
        redact::secrets(msg)
    );
    std::process::exit(EXIT_USAGE);
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let strs: Vec<&str> = args.iter().map(String::as_str).collect();
    let flags = match Flags::from_args(&strs[..1], &strs[1..]) {
        Ok(f) => f,
        Err(early) => {
            if early.status.is_ok() {
                println!("{}", early.output);
                std::process::exit(0);
            }
            eprintln!("{}", early.output.trim_end());
            std::process::exit(EXIT_USAGE);
        }
    };
    if flags.version {
        println!("pgtrickle-relay {}", env!("CARGO_PKG_VERSION"));
        return;
    }
    if let Some(Command::Probe(cmd)) = &flags.command {
        let addr = flag_or_env(flags.metrics_addr.clone(), "PGTRICKLE_RELAY_METRICS_ADDR")
            .unwrap_or_else(|| "127.0.0.1:9090".into());
        let path = if cmd.ready { "/readyz" } else { "/livez" };
        match http::probe(&addr, path) {
            Ok(()) => return,
            Err(e) => {
                eprintln!("pgtrickle-relay probe: {e}");
                std::process::exit(EXIT_FAILURE);
            }
        }
    }
    if let Some(Command::Sql(_)) = flags.command {
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(sql::script().as_bytes());
        return;
    }

    let format = match flag_or_env(flags.log_format, "PGTRICKLE_RELAY_LOG_FORMAT").as_deref() {
        None | Some("text") => logging::Format::Text,
        Some("json") => logging::Format::Json,
        Some(other) => usage_error(&format!("--log-format must be text or json, not {other:?}")),
    };
    let level = match flag_or_env(flags.log_level, "PGTRICKLE_RELAY_LOG_LEVEL") {
        None => log::LevelFilter::Info,
        Some(l) => l.parse().unwrap_or_else(|_| {
            usage_error(&format!(
                "--log-level must be error, warn, info, debug or trace, not {l:?}"
            ))
        }),
    };
    logging::init(format, level);

    let Some(url) = flag_or_env(flags.postgres_url, "PGTRICKLE_RELAY_POSTGRES_URL") else {
        usage_error("--postgres-url (or PGTRICKLE_RELAY_POSTGRES_URL) is required");
    };
    let postgres_url = pg::expand_env(&url).unwrap_or_else(|e| usage_error(&e));
    let relay_group = flag_or_env(flags.relay_group_id, "PGTRICKLE_RELAY_GROUP_ID")
        .unwrap_or_else(|| "default".into());
    if let Some(Command::Status(cmd)) = flags.command {
        let result = pg::connect(&postgres_url, "pgtrickle-relay status")
            .and_then(|mut c| status::collect(&mut c, &relay_group));
        match result {
            Ok(v) if cmd.json => println!("{v:#}"),
            Ok(v) => print!("{}", status::table(&v)),
            Err(e) => {
                log::error!("{e}");
                std::process::exit(EXIT_FAILURE);
            }
        }
        return;
    }
    if flags.batch_size == 0 {
        usage_error("--batch-size must be at least 1");
    }
    let settings = coordinator::Settings {
        postgres_url,
        relay_group,
        worker_id: format!("{}:{}", hostname(), std::process::id()),
        once: flags.once,
        only: flags.pipeline,
        batch_size: flags.batch_size,
        poll_interval: Duration::from_millis(flags.poll_interval_ms.max(10)),
        discovery_interval: Duration::from_secs(flags.discovery_interval_secs.max(1)),
        stall_timeout: Duration::from_secs(flags.stall_timeout_secs.max(1)),
    };
    let signals = match shutdown::Signals::install() {
        Ok(s) => s,
        Err(e) => {
            log::error!("installing signal handlers: {e}");
            std::process::exit(EXIT_FAILURE);
        }
    };
    log::info!(
        "pgtrickle-relay {} connecting to {}",
        env!("CARGO_PKG_VERSION"),
        pg::mask(&settings.postgres_url)
    );
    let metrics_addr = flag_or_env(flags.metrics_addr, "PGTRICKLE_RELAY_METRICS_ADDR")
        .unwrap_or_else(|| "0.0.0.0:9090".into());
    if !settings.once && metrics_addr != "off" {
        match http::serve(&metrics_addr, settings.stall_timeout) {
            Ok(addr) => log::info!("serving /metrics and /health on http://{addr}"),
            Err(e) => {
                log::error!("{e} (--metrics-addr; \"off\" disables it)");
                std::process::exit(EXIT_FAILURE);
            }
        }
    }
    std::process::exit(coordinator::run(&settings, &signals));
}
