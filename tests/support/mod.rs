//! Test harness: real PostgreSQL servers on free loopback ports, and the
//! relay binary run as a child process.
//!
//! Every server lives in its own temporary directory and is stopped when
//! its handle drops; the shared per-binary server is stopped at process
//! exit. PostgreSQL refuses to run as root, so when the tests run as root
//! the server runs as the `postgres` user through `runuser`.
#![allow(dead_code)]

use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

pub mod brokers;
pub mod kafka;
pub mod proxy;
pub mod rabbitmq;
pub mod sqlcheck;
pub mod sqs;

static SEQ: AtomicU32 = AtomicU32::new(0);
/// Data directories of servers to stop at process exit (statics are never
/// dropped).
static AT_EXIT: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// The directory with PostgreSQL's server binaries (`initdb`, `postgres`).
pub fn pg_bindir() -> PathBuf {
    if let Ok(dir) = std::env::var("PG_BINDIR") {
        return PathBuf::from(dir);
    }
    let mut versions: Vec<u32> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL server binaries are missing: run scripts/install-deps.sh")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    versions.sort();
    let v = versions
        .last()
        .expect("no PostgreSQL version under /usr/lib/postgresql");
    PathBuf::from(format!("/usr/lib/postgresql/{v}/bin"))
}

fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

/// A command that runs as the unprivileged `postgres` user when we are root.
fn pg_command(bin: &str) -> Command {
    let path = pg_bindir().join(bin);
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(path);
        c
    } else {
        Command::new(path)
    }
}

/// Remove the temporary directories of test processes that are gone: a
/// server shared by a test binary (a `static`) is never dropped, and a
/// killed test cleans up nothing, so each run would leave gigabytes behind.
fn sweep_stale_temp_dirs(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("pgtr-") else {
            continue;
        };
        // pgtr-<tag>-<pid>-<seq>: the pid is the second field from the end.
        let mut fields = rest.rsplitn(3, '-');
        let (_seq, pid) = (fields.next(), fields.next());
        let Some(pid) = pid.and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// A fresh, unique temporary directory (owned by `postgres` when root).
pub fn temp_dir(tag: &str) -> PathBuf {
    let base = std::env::var("PGTRICKLE_TEST_TMP").unwrap_or_else(|_| "/tmp".into());
    static SWEPT: std::sync::Once = std::sync::Once::new();
    SWEPT.call_once(|| sweep_stale_temp_dirs(Path::new(&base)));
    let dir = PathBuf::from(base).join(format!(
        "pgtr-{tag}-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn chown_postgres(dir: &Path) {
    if is_root() {
        let ok = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(dir)
            .status()
            .unwrap()
            .success();
        assert!(ok, "chown {dir:?}");
    }
}

/// A program of the harness's Python tool venv (`moto_server`, `tansu`),
/// installed by scripts/install-deps.sh; `PGTRICKLE_TOOLS` overrides where.
pub fn tool(name: &str) -> PathBuf {
    let dir = match std::env::var_os("PGTRICKLE_TOOLS") {
        Some(d) => PathBuf::from(d),
        None => {
            let cache = std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache"));
            cache.join("pgtrickle-relay/tools")
        }
    };
    let path = dir.join("bin").join(name);
    assert!(
        path.exists(),
        "{} is missing: run scripts/install-deps.sh",
        path.display()
    );
    path
}

/// A TCP port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// An initdb'd data directory, made once per test binary and copied for
/// every server (a copy is much faster than initdb).
fn template_data_dir() -> &'static Path {
    static TEMPLATE: OnceLock<PathBuf> = OnceLock::new();
    TEMPLATE.get_or_init(|| {
        let dir = temp_dir("template");
        chown_postgres(&dir);
        let data = dir.join("data");
        let out = pg_command("initdb")
            .arg("-D")
            .arg(&data)
            .args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync"])
            .output()
            .unwrap();
        assert!(out.status.success(), "initdb: {out:?}");
        data
    })
}

/// Signal the postmaster of `data` (runuser does not forward every signal).
fn signal_postmaster(data: &Path, sig: i32) -> bool {
    let pid = std::fs::read_to_string(data.join("postmaster.pid"))
        .ok()
        .and_then(|s| s.lines().next()?.trim().parse::<i32>().ok());
    match pid {
        Some(pid) => unsafe { libc::kill(pid, sig) == 0 },
        None => false,
    }
}

extern "C" fn stop_registered() {
    if let Ok(dirs) = AT_EXIT.lock() {
        for d in dirs.iter() {
            signal_postmaster(d, libc::SIGQUIT);
        }
    }
}

fn register_at_exit(data: PathBuf) {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| unsafe {
        libc::atexit(stop_registered);
    });
    AT_EXIT.lock().unwrap().push(data);
}

/// A private PostgreSQL server.
pub struct Pg {
    /// Its TCP port on 127.0.0.1.
    pub port: u16,
    /// Its temporary directory (data directory, socket, log).
    pub dir: PathBuf,
    child: Option<Child>,
    settings: Vec<String>,
}

impl Pg {
    /// The server shared by every test of this test binary; each test uses
    /// its own database (see [`Pg::new_db`]).
    pub fn shared() -> &'static Pg {
        static SHARED: OnceLock<Pg> = OnceLock::new();
        SHARED.get_or_init(|| {
            let pg = Pg::start();
            register_at_exit(pg.dir.join("data"));
            pg
        })
    }

    /// Start a new private server (stopped on drop).
    pub fn start() -> Pg {
        Pg::start_with(&[])
    }

    /// Start a new private server with extra `name=value` settings;
    /// `prepare` runs on its directory before the first start.
    pub fn start_with_files(settings: &[&str], prepare: impl FnOnce(&Path)) -> Pg {
        let mut pg = Pg::create(settings);
        prepare(&pg.dir);
        chown_postgres(&pg.dir);
        pg.launch();
        pg
    }

    /// Start a new private server with extra `name=value` settings.
    pub fn start_with(settings: &[&str]) -> Pg {
        Pg::start_with_files(settings, |_| {})
    }

    /// Start a new private server whose next transaction id is `xid`
    /// (`pg_resetwal -x` before the first start), like a cluster that has
    /// run for a long time. `xid` must start a pg_xact page (a multiple of
    /// 32768), so that the server creates that page itself.
    pub fn start_at_xid(xid: u64) -> Pg {
        assert_eq!(xid % 32768, 0, "xid must start a pg_xact page");
        let mut pg = Pg::create(&[]);
        let out = pg_command("pg_resetwal")
            .args(["-x", &xid.to_string(), "-D"])
            .arg(pg.dir.join("data"))
            .output()
            .unwrap();
        assert!(out.status.success(), "pg_resetwal: {out:?}");
        pg.launch();
        pg
    }

    /// Start a new private server from an `initdb` of its own: unlike the
    /// copies of the shared template, it has a system identifier of its
    /// own (`pg_control_system()`), as another cluster would.
    pub fn start_fresh() -> Pg {
        let mut pg = Pg::create(&[]);
        let data = pg.dir.join("data");
        std::fs::remove_dir_all(&data).unwrap();
        let out = pg_command("initdb")
            .arg("-D")
            .arg(&data)
            .args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync"])
            .output()
            .unwrap();
        assert!(out.status.success(), "initdb: {out:?}");
        pg.launch();
        pg
    }

    /// `pg_dump -Fc` of the database at `url` into a file of this test.
    pub fn dump(&self, url: &str) -> PathBuf {
        let file = temp_dir("dump").join("db.dump");
        let out = Command::new(pg_bindir().join("pg_dump"))
            .args(["-Fc", "-d", url, "-f"])
            .arg(&file)
            .output()
            .unwrap();
        assert!(out.status.success(), "pg_dump: {out:?}");
        file
    }

    /// Create database `name` on this server and `pg_restore` `dump` into
    /// it (roles are cluster-wide and not in a dump: `pgtrickle_relay` is
    /// created first, as `pg_dumpall --roles-only` would); returns its URL.
    pub fn restore(&self, name: &str, dump: &Path) -> String {
        let mut c = self.client(&self.url("postgres"));
        c.batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
            .unwrap();
        c.batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .unwrap();
        c.batch_execute(
            "DO $$ BEGIN CREATE ROLE pgtrickle_relay NOLOGIN;
             EXCEPTION WHEN duplicate_object THEN NULL; END $$",
        )
        .unwrap();
        let url = self.url(name);
        let out = Command::new(pg_bindir().join("pg_restore"))
            .args(["--exit-on-error", "-d", &url])
            .arg(dump)
            .output()
            .unwrap();
        assert!(out.status.success(), "pg_restore: {out:?}");
        url
    }

    fn create(settings: &[&str]) -> Pg {
        let dir = temp_dir("pg");
        let copy = Command::new("cp")
            .arg("-a")
            .arg(template_data_dir())
            .arg(dir.join("data"))
            .status()
            .unwrap();
        assert!(copy.success());
        chown_postgres(&dir);
        Pg {
            port: free_port(),
            dir,
            child: None,
            settings: settings.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn launch(&mut self) {
        let log = std::fs::File::create(self.dir.join("postgres.log")).unwrap();
        let child = pg_command("postgres")
            .arg("-D")
            .arg(self.dir.join("data"))
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-k")
            .arg(&self.dir)
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "max_connections=200",
                "-c",
                "shared_buffers=64MB",
                // Two-phase commit tests (PREPARE TRANSACTION).
                "-c",
                "max_prepared_transactions=10",
            ])
            .args(self.settings.iter().flat_map(|s| ["-c", s.as_str()]))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if postgres::Client::connect(&self.url("postgres"), postgres::NoTls).is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "PostgreSQL did not start: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default()
    }

    /// Stop the server (fast shutdown), keeping its data.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGINT to the postmaster: fast shutdown.
            if !signal_postmaster(&self.dir.join("data"), libc::SIGINT) {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }

    /// Start a stopped server again on the same port and data.
    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }

    /// Start it again after [`Pg::stop`].
    pub fn start_again(&mut self) {
        assert!(self.child.is_none());
        self.launch();
    }

    /// A connection URL for `db` as the superuser.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// A connection URL for `db` as `user` with `password`.
    pub fn url_as(&self, db: &str, user: &str, password: &str) -> String {
        format!("postgres://{user}:{password}@127.0.0.1:{}/{db}", self.port)
    }

    /// Create database `name` (dropping an old one) with the project's SQL
    /// installed through psql; returns its URL.
    pub fn new_db(&self, name: &str) -> String {
        let mut c = self.client(&self.url("postgres"));
        c.batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
            .unwrap();
        c.batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .unwrap();
        let url = self.url(name);
        self.install_sql(&url);
        url
    }

    /// Install `sql/install.sql` into the database at `url` with psql.
    pub fn install_sql(&self, url: &str) {
        let install = Path::new(env!("CARGO_MANIFEST_DIR")).join("sql/install.sql");
        let out = Command::new(pg_bindir().join("psql"))
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", url, "-f"])
            .arg(install)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "installing sql/: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Run SQL text through psql; returns (success, stdout, stderr).
    pub fn psql(&self, url: &str, sql: &str) -> (bool, String, String) {
        let out = Command::new(pg_bindir().join("psql"))
            .args([
                "-X",
                "-q",
                "-At",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                url,
                "-c",
                sql,
            ])
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// A client connection to `url`.
    pub fn client(&self, url: &str) -> postgres::Client {
        postgres::Client::connect(url, postgres::NoTls).unwrap()
    }
}

/// Settings of a server as users run one: PostgreSQL's default durability
/// (the harness's other servers turn all three off) and shared_buffers.
const DURABLE: &[&str] = &[
    "fsync=on",
    "synchronous_commit=on",
    "full_page_writes=on",
    "shared_buffers=128MB",
];

impl Pg {
    /// Start a new private server with PostgreSQL's default durability
    /// (`fsync`, `synchronous_commit`, `full_page_writes` on), for
    /// benchmarks; stopped on drop.
    pub fn durable() -> Pg {
        Pg::start_with(DURABLE)
    }

    /// The durable server (see [`Pg::durable`]) shared by this binary.
    pub fn shared_durable() -> &'static Pg {
        static SHARED: OnceLock<Pg> = OnceLock::new();
        SHARED.get_or_init(|| {
            let pg = Pg::durable();
            register_at_exit(pg.dir.join("data"));
            pg
        })
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if !signal_postmaster(&self.dir.join("data"), libc::SIGQUIT) {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The relay binary under test.
pub fn relay_bin() -> &'static str {
    env!("CARGO_BIN_EXE_pgtrickle-relay")
}

/// A relay command with `--postgres-url` set and `/metrics` on a free
/// port (see [`Relay::http_addr`]).
pub fn relay(url: &str) -> Command {
    let mut c = Command::new(relay_bin());
    c.arg("--postgres-url")
        .arg(url)
        .args(["--metrics-addr", "127.0.0.1:0"]);
    c
}

/// A running relay child process whose stderr is collected in the
/// background; killed on drop.
pub struct Relay {
    /// The child process.
    pub child: Child,
    stderr: std::sync::Arc<Mutex<String>>,
}

impl Relay {
    /// Spawn `cmd` with stdout and stderr piped (stdout stays available
    /// through `child.stdout`).
    pub fn spawn(cmd: &mut Command) -> Relay {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = std::sync::Arc::new(Mutex::new(String::new()));
        let sink = stderr.clone();
        let mut pipe = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 8192];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Relay { child, stderr }
    }

    /// Everything the relay logged so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Wait until the log contains `needle`, or panic after `secs`.
    pub fn wait_log(&self, needle: &str, secs: u64) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while !self.stderr().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "relay never logged {needle:?}; log:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The address its `/metrics` and `/health` are served on (from its log).
    pub fn http_addr(&self) -> String {
        self.wait_log("serving /metrics and /health on http://", 10);
        let log = self.stderr();
        let rest = log
            .split("serving /metrics and /health on http://")
            .nth(1)
            .unwrap();
        rest.split_whitespace().next().unwrap().to_string()
    }

    /// GET `path` from its HTTP endpoint: (status, body).
    pub fn get(&self, path: &str) -> (u16, String) {
        http_get(&self.http_addr(), path)
    }

    /// Send a signal.
    pub fn signal(&self, sig: i32) {
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// Wait for exit with a deadline; returns the exit code (None: killed).
    pub fn wait_exit(&mut self, secs: u64) -> Option<i32> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(
                Instant::now() < deadline,
                "relay did not exit in {secs}s; log:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Publish `n` one-event rows `{"n": start..start+n}` into outbox `orders`
/// of the database at `url`, in one transaction.
pub fn publish(url: &str, start: i64, n: i64) {
    Pg::shared()
        .client(url)
        .execute(
            "SELECT pgtrickle.outbox_publish('orders', jsonb_build_object('n', g)) \
             FROM generate_series($1::bigint, $2::bigint) g",
            &[&start, &(start + n - 1)],
        )
        .unwrap();
}

/// Publish `n` events `{"n": g, "tenant": "a" or "b", "agg": "agg-<g % 3>"}`
/// (tenants alternating) into outbox `orders`, then one `{"n": -1}` with
/// neither field, to route by content.
pub fn publish_tenants(url: &str, n: i64) {
    let mut c = Pg::shared().client(url);
    c.execute(
        "SELECT pgtrickle.outbox_publish('orders', jsonb_build_object('n', g, \
         'tenant', CASE WHEN g % 2 = 0 THEN 'a' ELSE 'b' END, 'agg', 'agg-' || g % 3)) \
         FROM generate_series(0, $1::bigint - 1) g",
        &[&n],
    )
    .unwrap();
    c.execute(
        "SELECT pgtrickle.outbox_publish('orders', '{\"n\": -1}'::jsonb)",
        &[],
    )
    .unwrap();
}

/// The dead letters of `url`: (dedup key, reason).
pub fn dead_letter_reasons(url: &str) -> Vec<(String, String)> {
    Pg::shared()
        .client(url)
        .query(
            "SELECT dedup_key, error FROM pgtrickle.relay_dead_letters ORDER BY dedup_key",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// Run `--once --pipeline fwd` against the database at `url`.
pub fn run_once(url: &str) -> std::process::Output {
    relay(url)
        .args(["--once", "--pipeline", "fwd"])
        .output()
        .unwrap()
}

/// The only row of `pgtrickle.relay_dead_letters` at `url`, which must be
/// of pipeline `fwd`, with `dedup_key` and a payload whose `n` is `n`;
/// returns its error.
pub fn the_one_dead_letter(url: &str, dedup_key: &str, n: i64) -> String {
    let rows = Pg::shared()
        .client(url)
        .query(
            "SELECT pipeline, dedup_key, (payload->'payload'->>'n')::bigint, error \
             FROM pgtrickle.relay_dead_letters",
            &[],
        )
        .unwrap();
    assert_eq!(rows.len(), 1, "dead letters");
    let (pipeline, key, got_n): (String, String, i64) =
        (rows[0].get(0), rows[0].get(1), rows[0].get(2));
    assert_eq!(
        (pipeline.as_str(), key.as_str(), got_n),
        ("fwd", dedup_key, n)
    );
    rows[0].get(3)
}

/// Configure reverse pipeline `rin` from `source` into inbox `events` of
/// the database at `url`.
pub fn set_inbox(url: &str, source: serde_json::Value) {
    Pg::shared()
        .client(url)
        .execute(
            "SELECT pgtrickle.set_relay_inbox('rin', 'events', $1::text::jsonb)",
            &[&source.to_string()],
        )
        .unwrap();
}

/// Rows in inbox `events` at `url`; -1 while the database is unreachable.
pub fn inbox_count(url: &str) -> i64 {
    match postgres::Client::connect(url, postgres::NoTls) {
        Ok(mut c) => c
            .query_one("SELECT count(*) FROM pgtrickle.events", &[])
            .map(|r| r.get(0))
            .unwrap_or(-1),
        Err(_) => -1,
    }
}

/// The `event_id`s in inbox `events` at `url`.
pub fn inbox_ids(url: &str) -> std::collections::HashSet<String> {
    Pg::shared()
        .client(url)
        .query("SELECT event_id FROM pgtrickle.events", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Run the relay on `url` and SIGKILL it once inbox `events` has more than
/// 100 of the `total` messages (waiting at most `secs`); it must not have
/// finished them all.
pub fn kill_relay_mid_inbox(url: &str, total: i64, secs: u64) {
    let mut first = Relay::spawn(&mut relay(url));
    wait_until(secs, "some messages in the inbox", || {
        inbox_count(url) > 100
    });
    first.signal(libc::SIGKILL);
    first.wait_exit(10);
    let got = inbox_count(url);
    assert!(
        got < total,
        "the relay finished before it was killed ({got})"
    );
}

/// A database `db` on the shared server with outbox `orders` and pipeline
/// `fwd` writing to `sink`; returns its URL.
pub fn outbox_pipeline(db: &str, sink: &serde_json::Value) -> String {
    let pg = Pg::shared();
    let url = pg.new_db(db);
    pg.client(&url)
        .execute(
            "SELECT pgtrickle.enable_outbox('orders'), \
             pgtrickle.set_relay_outbox('fwd', 'orders', 'default', $1::text::jsonb)",
            &[&sink.to_string()],
        )
        .unwrap();
    url
}

/// How many complete lines a file holds (missing file: 0); cheap enough
/// to poll while a large file grows.
#[allow(dead_code)]
pub fn count_lines(path: &Path) -> usize {
    std::fs::read(path)
        .map(|b| b.iter().filter(|c| **c == b'\n').count())
        .unwrap_or(0)
}

/// Read JSON lines from a file (missing file: none).
pub fn read_jsonl(path: &Path) -> Vec<serde_json::Value> {
    let Ok(bytes) = std::fs::read(path) else {
        return Vec::new();
    };
    let text = String::from_utf8_lossy(&bytes);
    // A last line without its newline is still being written (or was torn
    // by a kill, and is cut when the relay opens the file again).
    let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
    complete
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad line {l:?}: {e}")))
        .collect()
}

/// Poll `f` until it returns true, or panic with `what` after `secs`.
pub fn wait_until(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// A minimal HTTP/1.0 GET: (status, body).
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}
