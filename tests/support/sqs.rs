//! Private SQS servers for the sqs sink and source tests: `moto_server`
//! (from the harness's tool venv, see `scripts/install-deps.sh`) on a free
//! loopback port, stopped on drop (the shared one at process exit) and
//! restartable on the same port (empty: moto keeps everything in memory);
//! a small SigV4-signed client of the tests' own, to create queues and to
//! read them independently of the relay; and a forwarding proxy that can
//! refuse chosen actions.
//!
//! moto routes requests by their SigV4 credential scope, so every request
//! is signed (an unsigned one would be answered by its S3 mock).
#![cfg(feature = "sqs")]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{sign, SignableBody, SignableRequest, SigningSettings};
use aws_sigv4::sign::v4;
use serde_json::{json, Value};

use super::{free_port, temp_dir, tool};

/// The region every test uses.
pub const REGION: &str = "us-east-1";
/// moto's fixed account id (part of every queue URL).
pub const ACCOUNT: &str = "123456789012";

/// moto servers to kill at process exit (statics are never dropped).
static AT_EXIT: Mutex<Vec<i32>> = Mutex::new(Vec::new());

extern "C" fn kill_registered() {
    if let Ok(pids) = AT_EXIT.lock() {
        for &pid in pids.iter() {
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// A private moto_server.
pub struct Moto {
    /// Its port on 127.0.0.1.
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl Moto {
    /// The server shared by every test of this test binary; each test uses
    /// its own queues.
    pub fn shared() -> &'static Moto {
        static SHARED: OnceLock<Moto> = OnceLock::new();
        SHARED.get_or_init(|| {
            let m = Moto::start();
            static ONCE: OnceLock<()> = OnceLock::new();
            ONCE.get_or_init(|| unsafe {
                libc::atexit(kill_registered);
            });
            let pid = m.child.as_ref().unwrap().id() as i32;
            AT_EXIT.lock().unwrap().push(pid);
            m
        })
    }

    /// Start a new server (stopped on drop).
    pub fn start() -> Moto {
        let mut m = Moto {
            port: free_port(),
            dir: temp_dir("moto"),
            child: None,
        };
        m.launch();
        m
    }

    fn launch(&mut self) {
        let log = self.dir.join("moto.log");
        let child = Command::new(tool("moto_server"))
            .args(["-H", "127.0.0.1", "-p", &self.port.to_string()])
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(self.dir.join("moto.err")).unwrap())
            .spawn()
            .expect("starting moto_server (run scripts/install-deps.sh)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        let c = self.client();
        while c.call("ListQueues", json!({})).is_err() {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "moto_server exited ({status}): {}",
                    std::fs::read_to_string(self.dir.join("moto.err")).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "moto_server did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Its URL (the endpoint of every queue on it).
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// A signed client.
    pub fn client(&self) -> Sqs {
        Sqs::new(&self.endpoint())
    }

    /// Stop the server (its queues and messages are gone).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start it again, empty, on the same port.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none());
        self.launch();
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A minimal signed SQS client (AWS JSON protocol).
pub struct Sqs {
    endpoint: String,
    agent: ureq::Agent,
}

impl Sqs {
    /// A client for the server at `endpoint`.
    pub fn new(endpoint: &str) -> Sqs {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(60)))
            .build()
            .into();
        Sqs {
            endpoint: format!("{endpoint}/"),
            agent,
        }
    }

    /// Call `action`: the answer's JSON, or (status, body).
    pub fn call(&self, action: &str, body: Value) -> Result<Value, (u16, String)> {
        let body = body.to_string().into_bytes();
        let target = format!("AmazonSQS.{action}");
        let ct = "application/x-amz-json-1.0";
        let identity = Credentials::new("test", "test", None, None, "tests").into();
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region(REGION)
            .name("sqs")
            .time(SystemTime::now())
            .settings(SigningSettings::default())
            .build()
            .unwrap()
            .into();
        let headers = [("content-type", ct), ("x-amz-target", target.as_str())];
        let signable = SignableRequest::new(
            "POST",
            self.endpoint.as_str(),
            headers.into_iter(),
            SignableBody::Bytes(&body),
        )
        .unwrap();
        let (instructions, _) = sign(signable, &params).unwrap().into_parts();
        let mut req = self
            .agent
            .post(&self.endpoint)
            .header("Content-Type", ct)
            .header("X-Amz-Target", &target);
        for (k, v) in instructions.headers() {
            req = req.header(k, v);
        }
        let mut resp = req.send(&body[..]).map_err(|e| (0, e.to_string()))?;
        let status = resp.status().as_u16();
        let text = resp
            .body_mut()
            .with_config()
            .limit(64 << 20)
            .read_to_string()
            .map_err(|e| (status, e.to_string()))?;
        if status != 200 {
            return Err((status, text));
        }
        if text.is_empty() {
            return Ok(json!({}));
        }
        serde_json::from_str(&text).map_err(|e| (status, format!("{e}: {text}")))
    }

    /// Call `action`, panicking on an error.
    pub fn ok(&self, action: &str, body: Value) -> Value {
        self.call(action, body.clone())
            .unwrap_or_else(|e| panic!("sqs {action} {body}: {e:?}"))
    }

    /// Create queue `name` (FIFO when it ends in `.fifo`) with extra
    /// attributes; returns its URL.
    pub fn create_queue(&self, name: &str, attributes: Value) -> String {
        let mut attrs = attributes;
        if name.ends_with(".fifo") {
            attrs["FifoQueue"] = json!("true");
        }
        let r = self.ok(
            "CreateQueue",
            json!({"QueueName": name, "Attributes": attrs}),
        );
        r["QueueUrl"].as_str().unwrap().to_string()
    }

    /// Send `entries` (SendMessageBatch entries without `Id`), 10 at a time.
    pub fn send(&self, queue: &str, entries: &[Value]) {
        for chunk in entries.chunks(10) {
            let entries: Vec<Value> = chunk
                .iter()
                .enumerate()
                .map(|(i, e)| {
                    let mut e = e.clone();
                    e["Id"] = json!(i.to_string());
                    e
                })
                .collect();
            let r = self.ok(
                "SendMessageBatch",
                json!({"QueueUrl": queue, "Entries": entries}),
            );
            assert!(
                r["Failed"].as_array().is_none_or(|f| f.is_empty()),
                "SendMessageBatch: {r}"
            );
        }
    }

    /// Up to 10 messages, with every attribute.
    pub fn receive(&self, queue: &str, wait_seconds: u64) -> Vec<Value> {
        self.try_receive(queue, wait_seconds)
            .unwrap_or_else(|e| panic!("sqs ReceiveMessage on {queue}: {e:?}"))
    }

    /// Up to 10 messages, with every attribute, or the error (moto can
    /// answer 500 to concurrent receivers).
    pub fn try_receive(&self, queue: &str, wait_seconds: u64) -> Result<Vec<Value>, (u16, String)> {
        let r = self.call(
            "ReceiveMessage",
            json!({"QueueUrl": queue, "MaxNumberOfMessages": 10,
                   "WaitTimeSeconds": wait_seconds,
                   "AttributeNames": ["All"], "MessageSystemAttributeNames": ["All"],
                   "MessageAttributeNames": ["All"]}),
        )?;
        Ok(r["Messages"].as_array().cloned().unwrap_or_default())
    }

    /// Delete received messages.
    pub fn delete(&self, queue: &str, messages: &[Value]) {
        self.try_delete(queue, messages)
            .unwrap_or_else(|e| panic!("sqs DeleteMessageBatch on {queue}: {e:?}"))
    }

    /// Delete received messages, or the error.
    pub fn try_delete(&self, queue: &str, messages: &[Value]) -> Result<(), (u16, String)> {
        for chunk in messages.chunks(10) {
            let entries: Vec<Value> = chunk
                .iter()
                .enumerate()
                .map(|(i, m)| json!({"Id": i.to_string(), "ReceiptHandle": m["ReceiptHandle"]}))
                .collect();
            self.call(
                "DeleteMessageBatch",
                json!({"QueueUrl": queue, "Entries": entries}),
            )?;
        }
        Ok(())
    }

    /// Receive and delete messages until `done` holds for everything
    /// received so far; panics after `secs`.
    pub fn drain_until(
        &self,
        queue: &str,
        secs: u64,
        what: &str,
        done: impl Fn(&[Value]) -> bool,
    ) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        let mut got = Vec::new();
        while !done(&got) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {} messages received",
                got.len()
            );
            let batch = self.receive(queue, 1);
            self.delete(queue, &batch);
            got.extend(batch);
        }
        got
    }

    /// (visible, in flight) message counts of a queue.
    pub fn counts(&self, queue: &str) -> (u64, u64) {
        let r = self.ok(
            "GetQueueAttributes",
            json!({"QueueUrl": queue, "AttributeNames":
                   ["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]}),
        );
        let n = |k: &str| {
            r["Attributes"][k]
                .as_str()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        (
            n("ApproximateNumberOfMessages"),
            n("ApproximateNumberOfMessagesNotVisible"),
        )
    }
}

/// A message attribute's string value.
pub fn attr<'a>(m: &'a Value, name: &str) -> Option<&'a str> {
    m["MessageAttributes"][name]["StringValue"].as_str()
}

/// A forwarding proxy in front of an SQS server that answers the actions
/// in its refuse list (and the one request chosen with
/// [`Proxy::refuse_nth`]) with 503 ServiceUnavailable instead of
/// forwarding them, and counts the requests it forwards by action.
pub struct Proxy {
    /// Its port on 127.0.0.1.
    pub port: u16,
    refuse: Arc<Mutex<Vec<String>>>,
    /// (action, n): refuse the n-th request of action (1-based).
    nth: Arc<Mutex<Option<(String, usize)>>>,
    refused: Arc<Mutex<u64>>,
    forwarded: Arc<Mutex<Vec<String>>>,
    /// The access key id of every forwarded request's signature.
    access_keys: Arc<Mutex<Vec<String>>>,
    server: Arc<tiny_http::Server>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Proxy {
    /// A proxy to the server at `endpoint`.
    pub fn start(endpoint: &str) -> Proxy {
        let server = Arc::new(tiny_http::Server::http("127.0.0.1:0").expect("binding the proxy"));
        let port = server.server_addr().to_ip().unwrap().port();
        let refuse: Arc<Mutex<Vec<String>>> = Arc::default();
        let refused: Arc<Mutex<u64>> = Arc::default();
        let forwarded: Arc<Mutex<Vec<String>>> = Arc::default();
        let access_keys: Arc<Mutex<Vec<String>>> = Arc::default();
        let nth: Arc<Mutex<Option<(String, usize)>>> = Arc::default();
        let seen: Arc<Mutex<Vec<String>>> = Arc::default();
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(60)))
            .build()
            .into();
        let threads = (0..4)
            .map(|_| {
                let (server, refuse, refused, forwarded, agent) = (
                    server.clone(),
                    refuse.clone(),
                    refused.clone(),
                    forwarded.clone(),
                    agent.clone(),
                );
                let (nth, seen, access_keys) = (nth.clone(), seen.clone(), access_keys.clone());
                let target = format!("{endpoint}/");
                std::thread::spawn(move || {
                    while let Ok(mut req) = server.recv() {
                        let mut body = Vec::new();
                        let _ = req.as_reader().read_to_end(&mut body);
                        let header = |name: &str| {
                            req.headers()
                                .iter()
                                .find(|h| h.field.as_str().as_str().eq_ignore_ascii_case(name))
                                .map(|h| h.value.as_str().to_string())
                        };
                        let action = header("X-Amz-Target")
                            .unwrap_or_default()
                            .trim_start_matches("AmazonSQS.")
                            .to_string();
                        let count = {
                            let mut seen = seen.lock().unwrap();
                            seen.push(action.clone());
                            seen.iter().filter(|a| **a == action).count()
                        };
                        let chosen = nth.lock().unwrap().as_ref()
                            == Some(&(action.clone(), count));
                        if chosen || refuse.lock().unwrap().contains(&action) {
                            *refused.lock().unwrap() += 1;
                            let resp = tiny_http::Response::from_string(
                                r#"{"__type":"com.amazonaws.sqs#ServiceUnavailable","message":"refused by the test proxy"}"#,
                            )
                            .with_status_code(503);
                            let _ = req.respond(resp);
                            continue;
                        }
                        forwarded.lock().unwrap().push(action.clone());
                        if let Some(auth) = header("Authorization") {
                            let key = auth
                                .split("Credential=")
                                .nth(1)
                                .and_then(|c| c.split('/').next())
                                .unwrap_or_default();
                            access_keys.lock().unwrap().push(key.to_string());
                        }
                        let mut out = agent.post(&target);
                        for name in [
                            "Content-Type",
                            "X-Amz-Target",
                            "X-Amz-Date",
                            "X-Amz-Security-Token",
                            "Authorization",
                        ] {
                            if let Some(v) = header(name) {
                                out = out.header(name, v);
                            }
                        }
                        let (status, text) = match out.send(&body[..]) {
                            Ok(mut r) => (
                                r.status().as_u16(),
                                r.body_mut()
                                    .with_config()
                                    .limit(64 << 20)
                                    .read_to_vec()
                                    .unwrap_or_default(),
                            ),
                            Err(e) => (502, e.to_string().into_bytes()),
                        };
                        let ct = tiny_http::Header::from_bytes(
                            &b"Content-Type"[..],
                            &b"application/x-amz-json-1.0"[..],
                        )
                        .unwrap();
                        let _ = req.respond(
                            tiny_http::Response::from_data(text)
                                .with_status_code(status)
                                .with_header(ct),
                        );
                    }
                })
            })
            .collect();
        Proxy {
            port,
            refuse,
            nth,
            refused,
            forwarded,
            access_keys,
            server,
            threads,
        }
    }

    /// Its URL, to use as an `endpoint`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Refuse these actions from now on (none: forward everything).
    pub fn refuse(&self, actions: &[&str]) {
        *self.refuse.lock().unwrap() = actions.iter().map(|a| a.to_string()).collect();
    }

    /// Refuse the `n`-th request of `action` (1-based, counting every
    /// request of it since the proxy started), once.
    pub fn refuse_nth(&self, action: &str, n: usize) {
        *self.nth.lock().unwrap() = Some((action.to_string(), n));
    }

    /// The access key ids that signed the forwarded requests, in order.
    pub fn access_keys(&self) -> Vec<String> {
        self.access_keys.lock().unwrap().clone()
    }

    /// How many requests were refused so far.
    pub fn refused(&self) -> u64 {
        *self.refused.lock().unwrap()
    }

    /// How many `action` requests were forwarded so far.
    pub fn forwarded(&self, action: &str) -> usize {
        self.forwarded
            .lock()
            .unwrap()
            .iter()
            .filter(|a| *a == action)
            .count()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        for _ in 0..self.threads.len() {
            self.server.unblock();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
