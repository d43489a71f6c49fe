//! pgtrickle-relay: moves events between PostgreSQL outbox/inbox tables and
//! message brokers. Flags are defined here, in one place (everything else
//! is configured in SQL), and turned into one call of the library per mode:
//! `run`, `status`, `replay`, `check`, `sql` or `probe`.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use argh::FromArgs;
use pgtrickle_relay::{Exit, LogFormat, ReplayRequest, Settings};

/// Exit code: a `--once` run failed, the relay could not start, or a
/// command (`status`, `replay`, `check`, `probe`) failed or found problems.
const EXIT_FAILURE: u8 = 1;
/// Exit code: bad flags or settings.
const EXIT_USAGE: u8 = 2;

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
    Replay(ReplayCommand),
    Check(CheckCommand),
    Probe(ProbeCommand),
}

#[derive(FromArgs)]
/// Re-publish a range of a forward pipeline's outbox through its sink,
/// with the original dedup keys; the pipeline's position does not move.
#[argh(subcommand, name = "replay")]
struct ReplayCommand {
    /// the forward pipeline
    #[argh(positional)]
    pipeline: String,

    /// first outbox id to replay (refused when retention deleted it)
    #[argh(option)]
    from_id: Option<i64>,

    /// last outbox id to replay (default: the newest row now)
    #[argh(option)]
    to_id: Option<i64>,

    /// only rows created at or after this UTC time, e.g.
    /// 2026-12-01T08:00:00Z or "2026-12-01 08:00:00"
    #[argh(option)]
    since: Option<String>,

    /// print how many events and rows would be sent; send nothing
    #[argh(switch)]
    dry_run: bool,
}

#[derive(FromArgs)]
/// Validate the config of every pipeline (or those named) without running
/// them; exit 0 when all are fine, 1 otherwise.
#[argh(subcommand, name = "check")]
struct CheckCommand {
    /// pipelines to check (default: all in the catalog)
    #[argh(positional)]
    pipelines: Vec<String>,

    /// also reach each pipeline's outbox or inbox and its sink or source
    /// (nothing is sent or received)
    #[argh(switch)]
    connect: bool,

    /// print JSON instead of lines
    #[argh(switch)]
    json: bool,
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

/// Say what is wrong with the flags and exit with [`EXIT_USAGE`].
fn usage_error(msg: &str) -> ! {
    eprintln!(
        "pgtrickle-relay: {}\nRun pgtrickle-relay --help for usage.",
        pgtrickle_relay::redact_secrets(msg)
    );
    std::process::exit(EXIT_USAGE.into());
}

/// The exit status of a run.
fn exit_code(e: Exit) -> ExitCode {
    match e {
        Exit::Success => ExitCode::SUCCESS,
        Exit::Failure => ExitCode::from(EXIT_FAILURE),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let strs: Vec<&str> = args.iter().map(String::as_str).collect();
    let flags = match Flags::from_args(&strs[..1], &strs[1..]) {
        Ok(f) => f,
        Err(early) => {
            if early.status.is_ok() {
                println!("{}", early.output);
                return ExitCode::SUCCESS;
            }
            eprintln!("{}", early.output.trim_end());
            return ExitCode::from(EXIT_USAGE);
        }
    };
    if flags.version {
        println!("pgtrickle-relay {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    if let Some(Command::Probe(cmd)) = &flags.command {
        let addr = flag_or_env(flags.metrics_addr.clone(), "PGTRICKLE_RELAY_METRICS_ADDR")
            .unwrap_or_else(|| "127.0.0.1:9090".into());
        return match pgtrickle_relay::probe(&addr, cmd.ready) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("pgtrickle-relay probe: {e}");
                ExitCode::from(EXIT_FAILURE)
            }
        };
    }
    if let Some(Command::Sql(_)) = flags.command {
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(pgtrickle_relay::sql().as_bytes());
        return ExitCode::SUCCESS;
    }

    let format = match flag_or_env(flags.log_format, "PGTRICKLE_RELAY_LOG_FORMAT").as_deref() {
        None | Some("text") => LogFormat::Text,
        Some("json") => LogFormat::Json,
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
    pgtrickle_relay::init_logging(format, level);

    let Some(url) = flag_or_env(flags.postgres_url, "PGTRICKLE_RELAY_POSTGRES_URL") else {
        usage_error("--postgres-url (or PGTRICKLE_RELAY_POSTGRES_URL) is required");
    };
    let postgres_url =
        pgtrickle_relay::expand_env(&url).unwrap_or_else(|e| usage_error(&e.to_string()));
    let relay_group = flag_or_env(flags.relay_group_id, "PGTRICKLE_RELAY_GROUP_ID")
        .unwrap_or_else(|| "default".into());
    if let Some(Command::Status(cmd)) = flags.command {
        return match pgtrickle_relay::status(&postgres_url, &relay_group, cmd.json) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                log::error!("{e}");
                ExitCode::from(EXIT_FAILURE)
            }
        };
    }
    if flags.batch_size == 0 {
        usage_error("--batch-size must be at least 1");
    }
    match flags.command {
        Some(Command::Replay(cmd)) => {
            return replay(&postgres_url, cmd, flags.batch_size);
        }
        Some(Command::Check(cmd)) => {
            return match pgtrickle_relay::check(
                &postgres_url,
                &cmd.pipelines,
                cmd.connect,
                cmd.json,
                flags.batch_size,
            ) {
                Ok((text, ok)) => {
                    print!("{text}");
                    if ok {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::from(EXIT_FAILURE)
                    }
                }
                Err(e) => {
                    log::error!("{e}");
                    ExitCode::from(EXIT_FAILURE)
                }
            };
        }
        _ => {}
    }
    let metrics_addr = flag_or_env(flags.metrics_addr, "PGTRICKLE_RELAY_METRICS_ADDR")
        .unwrap_or_else(|| "0.0.0.0:9090".into());
    let settings = Settings {
        postgres_url,
        relay_group,
        worker_id: pgtrickle_relay::worker_id(),
        once: flags.once,
        only: flags.pipeline,
        batch_size: flags.batch_size,
        poll_interval: Duration::from_millis(flags.poll_interval_ms.max(10)),
        discovery_interval: Duration::from_secs(flags.discovery_interval_secs.max(1)),
        stall_timeout: Duration::from_secs(flags.stall_timeout_secs.max(1)),
        metrics_addr: Some(metrics_addr).filter(|a| !flags.once && a != "off"),
    };
    exit_code(pgtrickle_relay::run(&settings))
}

/// `pgtrickle-relay replay`: check the range flags, then replay.
fn replay(postgres_url: &str, cmd: ReplayCommand, batch_size: usize) -> ExitCode {
    if cmd.from_id.is_none() && cmd.since.is_none() {
        usage_error("replay needs --from-id or --since (where the range starts)");
    }
    if cmd.from_id.is_some_and(|id| id < 1) {
        usage_error("--from-id must be at least 1");
    }
    if let (Some(from), Some(to)) = (cmd.from_id, cmd.to_id) {
        if to < from {
            usage_error(&format!("--to-id {to} is before --from-id {from}"));
        }
    }
    let since = cmd.since.as_deref().map(|s| {
        humantime::parse_rfc3339_weak(s).unwrap_or_else(|e| {
            usage_error(&format!(
                "--since must be a UTC time like 2026-12-01T08:00:00Z, not {s:?}: {e}"
            ))
        })
    });
    let req = ReplayRequest {
        pipeline: cmd.pipeline,
        from_id: cmd.from_id,
        to_id: cmd.to_id,
        since,
        dry_run: cmd.dry_run,
        default_batch: batch_size,
    };
    match pgtrickle_relay::replay(postgres_url, &req) {
        Ok(report) => {
            // On stderr: stdout may be the pipeline's sink.
            eprint!("{report}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            log::error!("{e}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}
