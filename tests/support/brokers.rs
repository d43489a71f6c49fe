//! Private brokers for sink tests: redis-server and nats-server (JetStream)
//! on free loopback ports in temporary directories, stopped on drop and
//! restartable on the same port and data; and an HTTP receiver of our own.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{free_port, temp_dir};

/// Wait until something accepts TCP connections on `port`.
fn wait_port(port: u16, what: &str, log: &std::path::Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "{what} did not start: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn kill(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// A private redis-server (no persistence except the dump written by
/// [`Redis::stop`], so a stop/start keeps the data).
pub struct Redis {
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// Its temporary directory.
    pub dir: PathBuf,
    child: Option<Child>,
}

impl Redis {
    /// Start a new server.
    pub fn start() -> Redis {
        let mut r = Redis {
            port: free_port(),
            dir: temp_dir("redis"),
            child: None,
        };
        r.launch();
        r
    }

    fn launch(&mut self) {
        let log = self.dir.join("redis.log");
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .arg("--logfile")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is missing: run scripts/install-deps.sh");
        self.child = Some(child);
        wait_port(self.port, "redis-server", &log);
        // Loading the dump: wait until commands are served.
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.command(&["PING"]).contains("PONG") {
            assert!(
                Instant::now() < deadline,
                "redis-server never answered PING"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The URL of the server.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Send one command and return the raw RESP reply (empty on error).
    pub fn command(&self, args: &[&str]) -> String {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return String::new();
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        if s.write_all(req.as_bytes()).is_err() {
            return String::new();
        }
        let mut buf = [0u8; 4096];
        match s.read(&mut buf) {
            Ok(n) => String::from_utf8_lossy(&buf[..n]).into_owned(),
            Err(_) => String::new(),
        }
    }

    /// Stop the server, saving its data to disk first.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            self.command(&["SHUTDOWN", "SAVE"]);
            let deadline = Instant::now() + Duration::from_secs(10);
            while c.try_wait().unwrap().is_none() {
                if Instant::now() > deadline {
                    let _ = c.kill();
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    /// Start it again on the same port with the saved data.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none());
        self.launch();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        kill(&mut self.child);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A private nats-server with JetStream (file storage in its directory).
pub struct Nats {
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// Its temporary directory.
    pub dir: PathBuf,
    child: Option<Child>,
    /// A configuration file (`-c`), if any.
    config: Option<PathBuf>,
}

impl Nats {
    /// Start a new server.
    pub fn start() -> Nats {
        let mut n = Nats {
            port: free_port(),
            dir: temp_dir("nats"),
            child: None,
            config: None,
        };
        n.launch();
        n
    }

    /// Start a new server with `config` as its configuration file (the
    /// command line's JetStream, address and port still apply), e.g. users
    /// and permissions.
    pub fn start_with_config(config: &str) -> Nats {
        let dir = temp_dir("nats");
        let file = dir.join("nats.conf");
        std::fs::write(&file, config).unwrap();
        let mut n = Nats {
            port: free_port(),
            dir,
            child: None,
            config: Some(file),
        };
        n.launch();
        n
    }

    /// The URL of the server with a user and password.
    pub fn url_as(&self, user: &str, password: &str) -> String {
        format!("nats://{user}:{password}@127.0.0.1:{}", self.port)
    }

    fn launch(&mut self) {
        let log = self.dir.join("nats.log");
        let mut cmd = Command::new("nats-server");
        if let Some(c) = &self.config {
            cmd.arg("-c").arg(c);
        }
        let child = cmd
            .arg("-js")
            .arg("-sd")
            .arg(self.dir.join("js"))
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string()])
            .arg("-l")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server is missing: run scripts/install-deps.sh");
        self.child = Some(child);
        wait_port(self.port, "nats-server", &log);
    }

    /// The URL of the server.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Stop the server (SIGTERM: JetStream data is kept).
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

    /// Start it again on the same port with the same data.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none());
        self.launch();
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        kill(&mut self.child);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A request the HTTP receiver got.
#[derive(Debug, Clone)]
pub struct Received {
    /// `POST`, ...
    pub method: String,
    /// The path and query.
    pub url: String,
    /// Header (lowercase name, value) pairs.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
    /// The status it was answered with.
    pub status: u16,
}

impl Received {
    /// The value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

/// Chooses the answer to a request: (status, extra headers).
pub type Responder = dyn Fn(&Received) -> (u16, Vec<(String, String)>) + Send + Sync;

/// An HTTP receiver on a free loopback port that records every request
/// and answers what its responder says (200 by default). It can be
/// stopped (connections refused) and started again on the same port.
pub struct HttpReceiver {
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// Every request so far, in arrival order.
    pub requests: Arc<Mutex<Vec<Received>>>,
    responder: Arc<Mutex<Arc<Responder>>>,
    server: Option<Arc<tiny_http::Server>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl HttpReceiver {
    /// Start a receiver answering 200.
    pub fn start() -> HttpReceiver {
        let ok: Arc<Responder> = Arc::new(|_| (200, Vec::new()));
        let mut h = HttpReceiver {
            port: 0,
            requests: Arc::default(),
            responder: Arc::new(Mutex::new(ok)),
            server: None,
            threads: Vec::new(),
        };
        h.launch();
        h
    }

    fn launch(&mut self) {
        let server = Arc::new(
            tiny_http::Server::http(("127.0.0.1", self.port)).expect("binding the receiver"),
        );
        self.port = server.server_addr().to_ip().unwrap().port();
        self.threads = (0..4)
            .map(|_| {
                let (server, requests, responder) = (
                    server.clone(),
                    self.requests.clone(),
                    self.responder.clone(),
                );
                std::thread::spawn(move || {
                    while let Ok(mut req) = server.recv() {
                        // A client killed mid-request leaves a truncated
                        // body: a real server never processes it.
                        let mut body = Vec::new();
                        let complete = req.as_reader().read_to_end(&mut body).is_ok()
                            && req.body_length().is_none_or(|n| n == body.len());
                        if !complete {
                            continue;
                        }
                        let mut r = Received {
                            method: req.method().to_string(),
                            url: req.url().to_string(),
                            headers: req
                                .headers()
                                .iter()
                                .map(|h| {
                                    (
                                        h.field.as_str().as_str().to_ascii_lowercase(),
                                        h.value.as_str().to_string(),
                                    )
                                })
                                .collect(),
                            body,
                            status: 0,
                        };
                        let f = responder.lock().unwrap().clone();
                        let (status, extra) = f(&r);
                        r.status = status;
                        requests.lock().unwrap().push(r);
                        let mut resp = tiny_http::Response::from_string("")
                            .with_status_code(tiny_http::StatusCode(status));
                        for (k, v) in extra {
                            resp.add_header(
                                tiny_http::Header::from_bytes(k.as_bytes(), v.as_bytes()).unwrap(),
                            );
                        }
                        let _ = req.respond(resp);
                    }
                })
            })
            .collect();
        self.server = Some(server);
    }

    /// The receiver's URL for `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Answer from now on with `f`.
    pub fn respond_with(
        &self,
        f: impl Fn(&Received) -> (u16, Vec<(String, String)>) + Send + Sync + 'static,
    ) {
        *self.responder.lock().unwrap() = Arc::new(f);
    }

    /// The requests answered with a 2xx status.
    pub fn accepted(&self) -> Vec<Received> {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .filter(|r| (200..300).contains(&r.status))
            .cloned()
            .collect()
    }

    /// Stop listening: connections are refused until [`HttpReceiver::start_again`].
    pub fn stop(&mut self) {
        if let Some(server) = self.server.take() {
            for _ in 0..self.threads.len() {
                server.unblock();
            }
            for t in self.threads.drain(..) {
                let _ = t.join();
            }
        }
    }

    /// Listen again on the same port.
    pub fn start_again(&mut self) {
        assert!(self.server.is_none());
        self.launch();
    }
}

impl Drop for HttpReceiver {
    fn drop(&mut self) {
        self.stop();
    }
}
