//! A private rabbitmq-server node for tests and benchmarks, never the
//! system one: its own node name, AMQP and distribution ports, Mnesia and
//! log directories, config file (no system `rabbitmq.conf`, no system
//! `rabbitmq-env.conf`), plugin list (none) and Erlang cookie, all in a
//! temporary directory. As root, Debian's server runs as the `rabbitmq`
//! user, so the directory is handed to it.
//!
//! A node takes ~7 s to start: a test binary shares one
//! ([`Rabbit::shared`], killed with its whole process group at exit); a
//! test that stops and restarts the broker starts its own
//! ([`Rabbit::start`], stopped on drop). [`Rabbit::stop`] is a clean
//! shutdown (SIGTERM to the Erlang VM: durable queues and persistent
//! messages survive it) and [`Rabbit::start_again`] starts the same node
//! on the same ports and data. No Erlang VM outlives the test process.
//!
//! With the `rabbitmq` feature there are AMQP helpers too: declare a queue
//! and binding, publish with confirms, count, and read messages.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use super::{free_port, temp_dir};

/// The server script Debian installs (the `/usr/sbin` wrapper would log to
/// the system node's files when run as the `rabbitmq` user).
const SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";

/// Process groups (and directories) of shared nodes, killed at exit.
static AT_EXIT: Mutex<Vec<(i32, PathBuf)>> = Mutex::new(Vec::new());

extern "C" fn kill_registered() {
    if let Ok(nodes) = AT_EXIT.lock() {
        for (pgid, dir) in nodes.iter() {
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

/// A private RabbitMQ node.
pub struct Rabbit {
    /// Its AMQP port on 127.0.0.1.
    pub port: u16,
    /// Its Erlang distribution port.
    pub dist_port: u16,
    /// Its node name (`pgtr-<pid>-<n>@localhost`).
    pub node: String,
    /// Its temporary directory (data, logs, config).
    pub dir: PathBuf,
    child: Option<Child>,
    /// The Erlang VM's pid while it runs.
    beam: Option<i32>,
}

impl Rabbit {
    /// The node shared by every test of this test binary, with
    /// `max_message_size` 65536; each test uses its own exchanges and queues.
    pub fn shared() -> &'static Rabbit {
        static SHARED: OnceLock<Rabbit> = OnceLock::new();
        SHARED.get_or_init(|| {
            let r = Rabbit::start();
            static ONCE: OnceLock<()> = OnceLock::new();
            ONCE.get_or_init(|| unsafe {
                libc::atexit(kill_registered);
            });
            let pgid = r.child.as_ref().expect("running").id() as i32;
            AT_EXIT.lock().unwrap().push((pgid, r.dir.clone()));
            r
        })
    }

    /// Start a new node (`max_message_size` 65536), stopped on drop.
    pub fn start() -> Rabbit {
        assert!(
            Path::new(SERVER).exists(),
            "rabbitmq-server is missing ({SERVER}): run scripts/install-deps.sh"
        );
        let dir = temp_dir("rabbitmq");
        let port = free_port();
        let mut dist_port = free_port();
        while dist_port == port {
            dist_port = free_port();
        }
        let node = format!(
            "pgtr-{}@localhost",
            dir.file_name().unwrap().to_string_lossy()
        );
        for sub in ["mnesia", "log", "home"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        std::fs::write(dir.join("enabled_plugins"), "[].\n").unwrap();
        std::fs::write(dir.join("rabbitmq-env.conf"), "").unwrap();
        std::fs::write(
            dir.join("rabbitmq.conf"),
            format!(
                "listeners.tcp.1 = 127.0.0.1:{port}\n\
                 max_message_size = 65536\n\
                 loopback_users = none\n\
                 log.console = false\n\
                 log.file.level = info\n"
            ),
        )
        .unwrap();
        if is_root() {
            let ok = Command::new("chown")
                .args(["-R", "rabbitmq:rabbitmq"])
                .arg(&dir)
                .status()
                .unwrap()
                .success();
            assert!(ok, "chown rabbitmq {dir:?}");
        }
        let mut r = Rabbit {
            port,
            dist_port,
            node,
            dir,
            child: None,
            beam: None,
        };
        r.launch();
        r
    }

    fn launch(&mut self) {
        use std::os::unix::process::CommandExt;
        let d = &self.dir;
        let mut cmd = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "rabbitmq", "--", "env"]);
            c
        } else {
            Command::new("env")
        };
        // `env HOME=...`: runuser resets HOME, and the node's Erlang cookie
        // lives there: one of its own, not the system node's.
        cmd.arg(format!("HOME={}", d.join("home").display()))
            .arg(SERVER)
            .env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", d.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", d.join("log"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", d.join("enabled_plugins"))
            .env("RABBITMQ_CONFIG_FILE", d.join("rabbitmq.conf"))
            .env("RABBITMQ_CONF_ENV_FILE", d.join("rabbitmq-env.conf"))
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", d.join("advanced.config"))
            .env("RABBITMQ_PID_FILE", d.join("beam.pid"))
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .current_dir(d)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(d.join("server.out")).unwrap())
            .stderr(std::fs::File::create(d.join("server.err")).unwrap())
            // Its own process group: the VM and its helpers die with it.
            .process_group(0);
        let child = cmd
            .spawn()
            .expect("starting rabbitmq-server (run scripts/install-deps.sh)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(120);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            assert!(
                exited.is_none() && Instant::now() < deadline,
                "rabbitmq-server node {} did not start ({exited:?}): {}",
                self.node,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        self.beam = std::fs::read_to_string(self.dir.join("beam.pid"))
            .ok()
            .and_then(|s| s.trim().parse().ok());
    }

    /// The server's output and log so far, for failure messages.
    pub fn log(&self) -> String {
        let read = |f: &str| std::fs::read_to_string(self.dir.join(f)).unwrap_or_default();
        let log = read(&format!("log/{}.log", self.node));
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        format!(
            "{}{}\n...{}",
            read("server.out"),
            read("server.err"),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        )
    }

    /// The AMQP URL of the node (user guest).
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// Stop the node cleanly (its data stays for [`Rabbit::start_again`]).
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pgid = child.id() as i32;
        let deadline = Instant::now() + Duration::from_secs(60);
        if let Some(beam) = self.beam.take() {
            // SIGTERM: the VM shuts RabbitMQ down cleanly.
            unsafe { libc::kill(beam, libc::SIGTERM) };
            while Path::new(&format!("/proc/{beam}")).exists() && Instant::now() < deadline {
                // A zombie until the script reaps it: that counts as gone.
                let state =
                    std::fs::read_to_string(format!("/proc/{beam}/stat")).unwrap_or_default();
                if state.split(") ").nth(1).is_some_and(|s| s.starts_with('Z')) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        // Whatever is left of the group (the script, runuser, helpers).
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
        let _ = child.wait();
        // The listener is closed once the VM is gone.
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Start the node again on the same ports and data after [`Rabbit::stop`].
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "the node is running");
        self.launch();
    }
}

impl Drop for Rabbit {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// AMQP helpers on [`Rabbit`] (and what they return).
#[cfg(feature = "rabbitmq")]
pub mod amqp {
    use std::time::{Duration, Instant};

    use amiquip::{
        AmqpProperties, Channel, Confirm, Connection, ConsumerMessage, ConsumerOptions,
        ExchangeDeclareOptions, ExchangeType, FieldTable, Publish, QueueDeclareOptions,
    };

    use super::Rabbit;

    /// A message read back from a queue.
    #[derive(Debug, Clone)]
    pub struct Got {
        /// Its `message-id` property.
        pub message_id: Option<String>,
        /// Its routing key.
        pub routing_key: String,
        /// Its body.
        pub body: Vec<u8>,
        /// Its properties.
        pub properties: AmqpProperties,
    }

    impl Got {
        /// The body as JSON.
        pub fn json(&self) -> serde_json::Value {
            serde_json::from_slice(&self.body).unwrap()
        }

        /// A header, as text (strings and integers).
        pub fn header(&self, name: &str) -> Option<String> {
            match self.properties.headers().as_ref()?.get(name)? {
                amiquip::AmqpValue::LongString(s) => Some(s.clone()),
                amiquip::AmqpValue::LongLongInt(i) => Some(i.to_string()),
                amiquip::AmqpValue::LongInt(i) => Some(i.to_string()),
                other => Some(format!("{other:?}")),
            }
        }
    }

    impl Rabbit {
        /// A new connection and channel (the connection must outlive it).
        pub fn open(&self) -> (Connection, Channel) {
            let mut c = Connection::insecure_open(&self.url()).unwrap();
            let ch = c.open_channel(None).unwrap();
            (c, ch)
        }

        /// Declare durable queue `queue`, bound to durable topic exchange
        /// `exchange` (declared too) with `binding_key`, unless `exchange`
        /// is empty.
        pub fn declare(&self, queue: &str, exchange: &str, binding_key: &str) {
            let (c, ch) = self.open();
            ch.queue_declare(
                queue,
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
            )
            .unwrap();
            if !exchange.is_empty() {
                ch.exchange_declare(
                    ExchangeType::Topic,
                    exchange,
                    ExchangeDeclareOptions {
                        durable: true,
                        ..ExchangeDeclareOptions::default()
                    },
                )
                .unwrap();
                ch.queue_bind(queue, exchange, binding_key, FieldTable::new())
                    .unwrap();
            }
            drop(ch);
            c.close().unwrap();
        }

        /// Messages ready in `queue` (0 when it does not exist or the node
        /// is down).
        pub fn count(&self, queue: &str) -> u32 {
            let Ok(mut c) = Connection::insecure_open(&self.url()) else {
                return 0;
            };
            let Ok(ch) = c.open_channel(None) else {
                return 0;
            };
            ch.queue_declare_passive(queue)
                .ok()
                .and_then(|q| q.declared_message_count())
                .unwrap_or(0)
        }

        /// Publish persistent messages `(message id, type, body)` to
        /// `exchange` with `routing_key`, and wait for every confirm.
        pub fn publish(
            &self,
            exchange: &str,
            routing_key: &str,
            messages: &[(Option<String>, Option<String>, Vec<u8>)],
        ) {
            let (c, ch) = self.open();
            let confirms = ch.listen_for_publisher_confirms().unwrap();
            ch.enable_publisher_confirms().unwrap();
            for (id, kind, body) in messages {
                let mut props = AmqpProperties::default().with_delivery_mode(2);
                if let Some(id) = id {
                    props = props.with_message_id(id.clone());
                }
                if let Some(k) = kind {
                    props = props.with_type_(k.clone());
                }
                ch.basic_publish(exchange, Publish::with_properties(body, routing_key, props))
                    .unwrap();
            }
            let mut acked = 0u64;
            let n = messages.len() as u64;
            while acked < n {
                match confirms.recv_timeout(Duration::from_secs(30)).unwrap() {
                    Confirm::Ack(p) => acked = acked.max(p.delivery_tag),
                    Confirm::Nack(p) => panic!("broker nacked test message {p:?}"),
                }
            }
            drop(ch);
            c.close().unwrap();
        }

        /// Read (and acknowledge) messages of `queue` until `n` arrived,
        /// or panic after `secs`.
        pub fn take(&self, queue: &str, n: usize, secs: u64) -> Vec<Got> {
            let (c, ch) = self.open();
            ch.qos(0, 1000, false).unwrap();
            let consumer = ch.basic_consume(queue, ConsumerOptions::default()).unwrap();
            let deadline = Instant::now() + Duration::from_secs(secs);
            let mut got = Vec::with_capacity(n);
            while got.len() < n {
                let left = deadline.saturating_duration_since(Instant::now());
                assert!(
                    !left.is_zero(),
                    "{} of {n} messages arrived in queue {queue:?} within {secs}s",
                    got.len()
                );
                match consumer.receiver().recv_timeout(left) {
                    Ok(ConsumerMessage::Delivery(d)) => {
                        got.push(Got {
                            message_id: d.properties.message_id().clone(),
                            routing_key: d.routing_key.clone(),
                            body: d.body.clone(),
                            properties: d.properties.clone(),
                        });
                        consumer.ack(d).unwrap();
                    }
                    Ok(other) => panic!("consumer of {queue:?} ended: {other:?}"),
                    Err(_) => continue,
                }
            }
            drop(consumer);
            drop(ch);
            let _ = c.close();
            got
        }
    }
}
