//! A private Kafka-protocol broker for the `kafka` sink and source tests:
//! Tansu (from the harness's tool venv, see scripts/install-deps.sh) on a
//! free loopback port, stopped on drop and restartable on the same port;
//! plus small synchronous rdkafka helpers to create topics, produce and
//! read records independently of the relay.
//!
//! Tansu's memory storage forgets everything on restart, so a broker that
//! must survive a restart ([`Kafka::start_persistent`]) keeps its data in
//! S3 served by a private moto_server. Tansu reports a wrong high
//! watermark; these helpers never use watermarks.
#![cfg(feature = "kafka")]

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};

use super::{free_port, temp_dir, tool};

/// A private Tansu broker.
pub struct Kafka {
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// Its temporary directory (log).
    pub dir: PathBuf,
    child: Option<Child>,
    /// The moto_server keeping the data of a persistent broker, and its port.
    s3: Option<(Child, u16)>,
}

fn wait_port(port: u16, what: &str, log: &std::path::Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "{what} did not start: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// An unsigned HTTP PUT with an empty body; the status (0: no answer).
fn put(port: u16, path: &str) -> u16 {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return 0;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let req = format!(
        "PUT {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    if s.write_all(req.as_bytes()).is_err() {
        return 0;
    }
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    resp.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

impl Kafka {
    /// Start a broker with memory storage (lost on restart).
    pub fn start() -> Kafka {
        let mut k = Kafka {
            port: free_port(),
            dir: temp_dir("kafka"),
            child: None,
            s3: None,
        };
        k.launch();
        k
    }

    /// Start a broker whose data survives [`Kafka::stop`] /
    /// [`Kafka::start_again`]: Tansu's S3 storage on a private moto_server.
    pub fn start_persistent() -> Kafka {
        let dir = temp_dir("kafka");
        let s3_port = free_port();
        let log = dir.join("moto.log");
        let moto = Command::new(tool("moto_server"))
            .args(["-H", "127.0.0.1", "-p", &s3_port.to_string()])
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(dir.join("moto.err")).unwrap())
            .spawn()
            .expect("moto_server is missing: run scripts/install-deps.sh");
        wait_port(s3_port, "moto_server", &log);
        // The bucket (moto's S3 takes unsigned requests).
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let status = put(s3_port, "/tansu");
            if status == 200 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "moto_server did not create the bucket (status {status})"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let mut k = Kafka {
            port: free_port(),
            dir,
            child: None,
            s3: Some((moto, s3_port)),
        };
        k.launch();
        k
    }

    fn launch(&mut self) {
        let log = self.dir.join("tansu.log");
        let listener = format!("tcp://127.0.0.1:{}", self.port);
        let mut cmd = Command::new(tool("tansu"));
        cmd.arg("broker")
            .args(["--listener-url", &listener])
            .args(["--advertised-listener-url", &listener]);
        match &self.s3 {
            Some((_, s3_port)) => {
                cmd.args(["--storage-engine", "s3://tansu/"])
                    .env("AWS_ACCESS_KEY_ID", "test")
                    .env("AWS_SECRET_ACCESS_KEY", "test")
                    .env("AWS_DEFAULT_REGION", "us-east-1")
                    .env("AWS_ENDPOINT", format!("http://127.0.0.1:{s3_port}"))
                    .env("AWS_ALLOW_HTTP", "true");
            }
            None => {
                cmd.args(["--storage-engine", "memory://tansu/"]);
            }
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(self.dir.join("tansu.err")).unwrap())
            .spawn()
            .expect("tansu is missing: run scripts/install-deps.sh");
        self.child = Some(child);
        wait_port(self.port, "tansu", &log);
    }

    /// `host:port` for `brokers` / `bootstrap.servers`.
    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Stop the broker: SIGTERM, as a service manager stops it (SIGKILL
    /// after 10 s).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while c.try_wait().unwrap().is_none() {
                if Instant::now() > deadline {
                    let _ = c.kill();
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    /// Start it again on the same port (and the same data, if persistent).
    pub fn start_again(&mut self) {
        assert!(self.child.is_none());
        self.launch();
    }

    /// Create `topic` with `partitions` partitions.
    pub fn create_topic(&self, topic: &str, partitions: u32) {
        let out = Command::new(tool("tansu"))
            .args(["topic", "create", "--broker"])
            .arg(format!("tcp://127.0.0.1:{}", self.port))
            .args(["--partitions", &partitions.to_string(), topic])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "creating topic {topic}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", self.brokers());
        c
    }

    /// The number of partitions of `topic`.
    pub fn partitions(&self, topic: &str) -> usize {
        let c: BaseConsumer = self.config().create().unwrap();
        let md = c
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .unwrap();
        md.topics()
            .iter()
            .find(|t| t.name() == topic)
            .map(|t| t.partitions().len())
            .unwrap_or(0)
    }

    /// Produce records to `topic` and wait until all are stored.
    pub fn produce(&self, topic: &str, records: &[Produce]) {
        produce_to(&self.brokers(), topic, records);
    }

    /// Every record of `topic` so far, read from the beginning of each
    /// partition until `min` records are there (or the deadline passes).
    pub fn read(&self, topic: &str, min: usize, secs: u64) -> Vec<Record> {
        let c: BaseConsumer = self
            .config()
            .set("group.id", format!("test-reader-{}", free_port()))
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let n = self.partitions(topic);
        let mut tpl = TopicPartitionList::new();
        for p in 0..n {
            tpl.add_partition_offset(topic, p as i32, Offset::Beginning)
                .unwrap();
        }
        c.assign(&tpl).unwrap();
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(secs);
        let mut quiet_since = Instant::now();
        while Instant::now() < deadline {
            match c.poll(Duration::from_millis(100)) {
                Some(Ok(m)) => {
                    quiet_since = Instant::now();
                    out.push(Record {
                        partition: m.partition(),
                        offset: m.offset(),
                        key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                        value: m.payload().map(|v| v.to_vec()).unwrap_or_default(),
                        headers: m
                            .headers()
                            .map(|h| {
                                h.iter()
                                    .map(|x| {
                                        (
                                            x.key.to_string(),
                                            String::from_utf8_lossy(x.value.unwrap_or_default())
                                                .into_owned(),
                                        )
                                    })
                                    .collect()
                            })
                            .unwrap_or_default(),
                    });
                }
                Some(Err(e)) => eprintln!("test reader: {e}"),
                None => {
                    // Enough, and nothing more for a while: done.
                    if out.len() >= min && quiet_since.elapsed() > Duration::from_millis(500) {
                        break;
                    }
                }
            }
        }
        out
    }

    /// The offsets committed by consumer group `group` on `topic`, by
    /// partition (partitions without a commit are left out).
    pub fn committed(&self, group: &str, topic: &str) -> HashMap<i32, i64> {
        let c: BaseConsumer = self
            .config()
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let n = self.partitions(topic);
        let mut tpl = TopicPartitionList::new();
        for p in 0..n {
            tpl.add_partition(topic, p as i32);
        }
        let got = c
            .committed_offsets(tpl, Duration::from_secs(10))
            .expect("fetching committed offsets");
        got.elements()
            .iter()
            .filter_map(|e| match e.offset() {
                Offset::Offset(o) => Some((e.partition(), o)),
                _ => None,
            })
            .collect()
    }
}

/// Produce `(key, value, headers)` records to `topic` of the broker at
/// `brokers` (partition by key hash) and wait until all are stored.
pub fn produce_to(brokers: &str, topic: &str, records: &[Produce]) {
    let p: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "1")
        .set("enable.idempotence", "true")
        .create()
        .unwrap();
    for (key, value, headers) in records {
        let mut h = rdkafka::message::OwnedHeaders::new();
        for (k, v) in headers {
            h = h.insert(rdkafka::message::Header {
                key: k,
                value: Some(v.as_str()),
            });
        }
        let mut r = BaseRecord::<String, Vec<u8>>::to(topic)
            .payload(value)
            .headers(h);
        if let Some(k) = key {
            r = r.key(k);
        }
        let mut r = r;
        loop {
            match p.send(r) {
                Ok(()) => break,
                Err((_, back)) => {
                    r = back;
                    p.poll(Duration::from_millis(10));
                }
            }
        }
    }
    p.flush(Duration::from_secs(60))
        .expect("test producer flush");
}

/// A record to produce: key, value, headers (name, value).
pub type Produce = (Option<String>, Vec<u8>, Vec<(String, String)>);

/// A record as the test reader saw it.
#[derive(Debug, Clone)]
pub struct Record {
    /// Its partition.
    pub partition: i32,
    /// Its offset.
    pub offset: i64,
    /// Its key, as text.
    pub key: Option<String>,
    /// Its value.
    pub value: Vec<u8>,
    /// Its headers (name, value as text).
    pub headers: Vec<(String, String)>,
}

impl Record {
    /// The value as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.value).unwrap()
    }

    /// Header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

impl Drop for Kafka {
    fn drop(&mut self) {
        self.stop();
        if let Some((mut moto, _)) = self.s3.take() {
            let _ = moto.kill();
            let _ = moto.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
