//! A small synchronous Amazon SQS client, shared by the `sqs` sink and the
//! `sqs` source: the AWS JSON protocol (`POST /` with
//! `X-Amz-Target: AmazonSQS.<Action>` and
//! `Content-Type: application/x-amz-json-1.0`) over ureq, every request
//! signed with Signature Version 4 (`aws-sigv4`). No AWS SDK, no async
//! runtime.
//!
//! Connection keys, the same for the sink and the source (`sink.<key>` or
//! `source.<key>`):
//! - `queue_url` (required): `https://sqs.<region>.amazonaws.com/<account>/<name>`;
//!   a name ending in `.fifo` is a FIFO queue.
//! - `region`: the signing region. Default: `AWS_REGION`, then
//!   `AWS_DEFAULT_REGION`, then the region in an AWS queue URL's host.
//! - `endpoint`: where requests go (a VPC endpoint, an SQS-compatible test
//!   server). Default: the scheme and host of `queue_url`.
//! - `access_key_id`, `secret_access_key` (both or neither) and
//!   `session_token`. Default: the AWS SDKs' credential chain (the
//!   environment, the shared files' profile, web identity, ECS container
//!   credentials, EC2 instance metadata; see [`crate::broker::aws_credentials`]).
//! - `timeout_ms`: per request (default 30000; a long poll adds its wait).
//!
//! Every value may use `${ENV:NAME}` or `${CREDENTIAL:NAME}`. The secret key
//! and the session token never appear in a log line, an error or /health.
//!
//! Errors: connection failures, timeouts, HTTP 5xx and 429, throttling and
//! internal-error codes, and `QueueDoesNotExist` (a queue that is being
//! created or re-created) are transient; anything else SQS refuses (bad
//! credentials, access denied, invalid parameters) is permanent.

use std::io::Read;
use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{sign, SignableBody, SignableRequest, SigningSettings};
use aws_sigv4::sign::v4;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::broker::aws_credentials::{describe, CredentialError, Provider};
use crate::keys::{from_value, ConfigError, Fallback, KeySpec};
use crate::pg::expand_env;
use crate::retry::Error;

/// The `timeout_ms` key both directions take.
pub const TIMEOUT_KEY: KeySpec = KeySpec::new(
    "timeout_ms",
    "integer",
    Fallback::Value("30000"),
    "the time limit of a request",
);

/// Entries per batch action (`SendMessageBatch`, `DeleteMessageBatch`, ...).
pub const MAX_BATCH: usize = 10;
/// The default per-request timeout.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest answer read (ten messages of 1 MiB, with room to spare).
const MAX_ANSWER: u64 = 32 << 20;
/// Bytes of an unexpected answer kept for an error message.
const SNIPPET: usize = 300;
/// Error codes that go away by themselves.
const TRANSIENT_CODES: &[&str] = &[
    "ThrottlingException",
    "Throttling",
    "RequestThrottled",
    "TooManyRequestsException",
    "ServiceUnavailable",
    "InternalError",
    "InternalFailure",
    "RequestTimeout",
    "RequestTimeoutException",
    "KmsThrottled",
    "KMS.ThrottlingException",
    "QueueDoesNotExist",
    "AWS.SimpleQueueService.NonExistentQueue",
];

/// The connection keys of an `sqs` sink or source, as configured (its
/// `Debug` hides the secret key and the session token).
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnKeys {
    queue_url: String,
    #[serde(default)]
    region: Option<String>,
    #[serde(default)]
    endpoint: Option<String>,
    #[serde(default)]
    access_key_id: Option<String>,
    #[serde(default)]
    secret_access_key: Option<String>,
    #[serde(default)]
    session_token: Option<String>,
    #[serde(default)]
    timeout_ms: Option<u64>,
}

impl std::fmt::Debug for ConnKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hidden = |v: &Option<String>| v.as_ref().map(|_| "***");
        f.debug_struct("ConnKeys")
            .field("queue_url", &self.queue_url)
            .field("region", &self.region)
            .field("endpoint", &self.endpoint)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &hidden(&self.secret_access_key))
            .field("session_token", &hidden(&self.session_token))
            .field("timeout_ms", &self.timeout_ms)
            .finish()
    }
}

/// The names of [`ConnKeys`]' keys.
pub const CONN_KEYS: &[&str] = &[
    "queue_url",
    "region",
    "endpoint",
    "access_key_id",
    "secret_access_key",
    "session_token",
    "timeout_ms",
];

/// Whether `s` is an http(s) URL, or comes from `${...}` (checked when opened).
fn url_or_reference(s: &str) -> bool {
    s.starts_with("http://") || s.starts_with("https://") || s.starts_with("${")
}

impl ConnKeys {
    /// Take the connection keys out of a sink's or source's keys (`prefix`
    /// is `sink` or `source`, for error messages) and check them.
    pub fn take(keys: &mut Map<String, Value>, prefix: &str) -> Result<ConnKeys, ConfigError> {
        let mut mine = Map::new();
        for k in CONN_KEYS {
            if let Some(v) = keys.remove(*k) {
                mine.insert(k.to_string(), v);
            }
        }
        let c: ConnKeys = from_value(prefix, Value::Object(mine))?;
        let key = |k: &str| format!("{prefix}.{k}");
        if c.queue_url.is_empty() {
            return Err(ConfigError::new(key("queue_url"), "must not be empty"));
        }
        if !url_or_reference(&c.queue_url) {
            return Err(ConfigError::new(
                key("queue_url"),
                "expected https://sqs.<region>.amazonaws.com/<account>/<queue name>",
            ));
        }
        if let Some(e) = &c.endpoint {
            if !url_or_reference(e) {
                return Err(ConfigError::new(
                    key("endpoint"),
                    "expected an http:// or https:// URL",
                ));
            }
        }
        for (k, v) in [
            ("region", &c.region),
            ("access_key_id", &c.access_key_id),
            ("secret_access_key", &c.secret_access_key),
            ("session_token", &c.session_token),
        ] {
            if v.as_deref() == Some("") {
                return Err(ConfigError::new(key(k), "must not be empty"));
            }
        }
        match (&c.access_key_id, &c.secret_access_key) {
            (Some(_), None) => {
                return Err(ConfigError::new(
                    key("secret_access_key"),
                    format!("missing (it goes with {})", key("access_key_id")),
                ))
            }
            (None, Some(_)) => {
                return Err(ConfigError::new(
                    key("access_key_id"),
                    format!("missing (it goes with {})", key("secret_access_key")),
                ))
            }
            _ => {}
        }
        if c.session_token.is_some() && c.access_key_id.is_none() {
            return Err(ConfigError::new(
                key("session_token"),
                format!(
                    "needs {} and {}",
                    key("access_key_id"),
                    key("secret_access_key")
                ),
            ));
        }
        if c.timeout_ms == Some(0) {
            return Err(ConfigError::new(key("timeout_ms"), "must be at least 1"));
        }
        Ok(c)
    }
}

/// The region in an AWS queue URL's host (`sqs.<region>.amazonaws.com` or
/// `<region>.queue.amazonaws.com`).
fn region_of(queue_url: &str) -> Option<String> {
    let host = authority(queue_url)?.split(':').next()?;
    let parts: Vec<&str> = host.split('.').collect();
    match parts.as_slice() {
        ["sqs", region, "amazonaws", ..] => Some(region.to_string()),
        [region, "queue", "amazonaws", ..] => Some(region.to_string()),
        _ => None,
    }
}

/// The `host[:port]` of an http(s) URL.
fn authority(url: &str) -> Option<&str> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))?;
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    Some(&rest[..end]).filter(|a| !a.is_empty())
}

/// An open SQS client for one queue.
pub struct Client {
    agent: ureq::Agent,
    /// Where requests are POSTed: the endpoint with path `/`.
    url: String,
    queue_url: String,
    region: String,
    creds: Provider,
    timeout: Duration,
    fifo: bool,
}

/// A refusal by SQS, or a failure to reach it.
#[derive(Debug)]
pub struct Refusal {
    /// The error code (`QueueDoesNotExist`, ...), or `"connection"`.
    pub code: String,
    /// What went wrong, naming the action and the queue.
    pub error: Error,
}

impl Client {
    /// Open a client for the queue of `keys` (`prefix` is `sink` or
    /// `source`); errors name `pipeline` and the key.
    pub fn open(keys: &ConnKeys, pipeline: &str, prefix: &str) -> Result<Client, Error> {
        let bad = |k: &str, e: String| {
            Error::permanent(format!("pipeline {pipeline:?}: {prefix}.{k}: {e}"))
        };
        let expand = |k: &str, v: &Option<String>| -> Result<Option<String>, Error> {
            v.as_deref()
                .map(|v| expand_env(v).map_err(|e| bad(k, e.msg)))
                .transpose()
        };
        let queue_url = expand_env(&keys.queue_url).map_err(|e| bad("queue_url", e.msg))?;
        let Some(queue_host) = authority(&queue_url) else {
            return Err(bad(
                "queue_url",
                "expected https://sqs.<region>.amazonaws.com/<account>/<queue name>".into(),
            ));
        };
        let endpoint = match expand("endpoint", &keys.endpoint)? {
            Some(e) => {
                if authority(&e).is_none() {
                    return Err(bad(
                        "endpoint",
                        "expected an http:// or https:// URL".into(),
                    ));
                }
                e
            }
            None => {
                let scheme = if queue_url.starts_with("https://") {
                    "https"
                } else {
                    "http"
                };
                format!("{scheme}://{queue_host}")
            }
        };
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let region = expand("region", &keys.region)?
            .or_else(|| env("AWS_REGION"))
            .or_else(|| env("AWS_DEFAULT_REGION"))
            .or_else(|| region_of(&queue_url))
            .ok_or_else(|| {
                bad(
                    "region",
                    "not set, and neither AWS_REGION nor AWS_DEFAULT_REGION is".into(),
                )
            })?;
        let own = match (
            expand("access_key_id", &keys.access_key_id)?,
            expand("secret_access_key", &keys.secret_access_key)?,
        ) {
            (Some(id), Some(secret)) => {
                Some((id, secret, expand("session_token", &keys.session_token)?))
            }
            _ => None,
        };
        let agent = crate::broker::http::agent(None);
        let creds = Provider::find(own, &region, agent.clone()).map_err(|e| match e {
            CredentialError::Missing(why) => Error::permanent(format!(
                "pipeline {pipeline:?}: {why}; or set {prefix}.access_key_id and {prefix}.secret_access_key"
            )),
            CredentialError::Failed(why) => {
                Error::transient(format!("pipeline {pipeline:?}: AWS credentials: {why}"))
            }
        })?;
        log::info!(
            "pipeline {pipeline:?}: AWS credentials from {}",
            creds.origin
        );
        let fifo = queue_url.trim_end_matches('/').ends_with(".fifo");
        Ok(Client {
            agent,
            url: format!("{}/", endpoint.trim_end_matches('/')),
            queue_url,
            region,
            creds,
            timeout: keys
                .timeout_ms
                .map(Duration::from_millis)
                .unwrap_or(DEFAULT_TIMEOUT),
            fifo,
        })
    }

    /// The queue's URL.
    pub fn queue_url(&self) -> &str {
        &self.queue_url
    }

    /// Whether the queue is a FIFO queue (its name ends in `.fifo`).
    pub fn is_fifo(&self) -> bool {
        self.fifo
    }

    /// Call `action` with the JSON `body`; `extra` is added to the request
    /// timeout (a long poll's wait). The answer's JSON, or why not.
    pub fn call(&self, action: &str, body: &Value, extra: Duration) -> Result<Value, Refusal> {
        let what = format!("sqs {action} on {}", self.queue_url);
        let fail = |code: &str, error: Error| Refusal {
            code: code.to_string(),
            error,
        };
        let body = serde_json::to_vec(body)
            .map_err(|e| fail("encoding", Error::permanent(format!("{what}: {e}"))))?;
        let target = format!("AmazonSQS.{action}");
        let content_type = "application/x-amz-json-1.0";
        let creds = self.creds.get().map_err(|e| {
            fail(
                "credentials",
                Error::transient(format!("{what}: AWS credentials: {}", describe(&e))),
            )
        })?;
        let signed = self
            .sign(creds, &target, content_type, &body)
            .map_err(|e| fail("signing", Error::permanent(format!("{what}: signing: {e}"))))?;
        let mut req = self
            .agent
            .post(&self.url)
            .header("Content-Type", content_type)
            .header("X-Amz-Target", &target);
        for (k, v) in &signed {
            req = req.header(k.as_str(), v.as_str());
        }
        let req = req
            .config()
            .timeout_global(Some(self.timeout + extra))
            .build();
        let mut resp = match req.send(&body[..]) {
            Ok(r) => r,
            Err(e) => return Err(fail("connection", Error::transient(format!("{what}: {e}")))),
        };
        let status = resp.status().as_u16();
        let query_error = resp
            .headers()
            .get("x-amzn-query-error")
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or("").to_string());
        let mut bytes = Vec::new();
        if let Err(e) = resp
            .body_mut()
            .as_reader()
            .take(MAX_ANSWER)
            .read_to_end(&mut bytes)
        {
            return Err(fail(
                "connection",
                Error::transient(format!("{what}: reading the answer: {e}")),
            ));
        }
        let json: Option<Value> = if bytes.is_empty() {
            Some(Value::Object(Map::new()))
        } else {
            serde_json::from_slice(&bytes).ok()
        };
        let snippet = || {
            let n = bytes.len().min(SNIPPET);
            String::from_utf8_lossy(&bytes[..n]).trim().to_string()
        };
        if status == 200 {
            return match json {
                Some(v) if v.is_object() => Ok(v),
                _ => Err(fail(
                    "answer",
                    Error::permanent(format!(
                        "{what}: not an SQS JSON answer (is the endpoint an SQS API?): {}",
                        snippet()
                    )),
                )),
            };
        }
        let field = |names: &[&str]| {
            json.as_ref().and_then(|j| {
                names
                    .iter()
                    .find_map(|n| j.get(*n).and_then(Value::as_str).map(str::to_string))
            })
        };
        // `__type` is `com.amazonaws.sqs#QueueDoesNotExist`.
        let code = field(&["__type", "code", "Code"])
            .map(|t| t.rsplit('#').next().unwrap_or("").to_string())
            .filter(|c| !c.is_empty())
            .or(query_error)
            .unwrap_or_else(|| format!("HTTP{status}"));
        let message = field(&["message", "Message"]).unwrap_or_else(snippet);
        let msg = format!("{what}: {code} (HTTP {status}): {message}");
        let error = if status >= 500 || status == 429 || transient_code(&code) {
            Error::transient(msg)
        } else {
            Error::permanent(msg)
        };
        Err(fail(&code, error))
    }

    /// The SigV4 headers for a POST of `body`.
    fn sign(
        &self,
        creds: Credentials,
        target: &str,
        content_type: &str,
        body: &[u8],
    ) -> Result<Vec<(String, String)>, String> {
        let identity = creds.into();
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region(&self.region)
            .name("sqs")
            .time(SystemTime::now())
            .settings(SigningSettings::default())
            .build()
            .map_err(|e| e.to_string())?
            .into();
        let headers = [("content-type", content_type), ("x-amz-target", target)];
        let request = SignableRequest::new(
            "POST",
            self.url.as_str(),
            headers.into_iter(),
            SignableBody::Bytes(body),
        )
        .map_err(|e| e.to_string())?;
        let (instructions, _) = sign(request, &params)
            .map_err(|e| e.to_string())?
            .into_parts();
        Ok(instructions
            .headers()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect())
    }
}

/// Whether an SQS error code goes away by itself.
pub fn transient_code(code: &str) -> bool {
    TRANSIENT_CODES.contains(&code)
}

/// Whether an SQS error code says the queue does not exist.
pub fn missing_queue(code: &str) -> bool {
    code == "QueueDoesNotExist" || code == "AWS.SimpleQueueService.NonExistentQueue"
}

/// One failed entry of a batch action's answer.
#[derive(Debug, Clone, PartialEq)]
pub struct EntryError {
    /// The entry's `Id`.
    pub id: String,
    /// The error code.
    pub code: String,
    /// SQS's message.
    pub message: String,
    /// Whether retrying can help (not the sender's fault, or a transient code).
    pub transient: bool,
}

/// The `Failed` entries of a batch action's answer.
pub fn failed_entries(answer: &Value) -> Vec<EntryError> {
    let Some(failed) = answer.get("Failed").and_then(Value::as_array) else {
        return Vec::new();
    };
    failed
        .iter()
        .map(|f| {
            let s = |k: &str| f.get(k).and_then(Value::as_str).unwrap_or("").to_string();
            let code = s("Code");
            let sender_fault = f
                .get("SenderFault")
                .and_then(Value::as_bool)
                .unwrap_or(true);
            EntryError {
                id: s("Id"),
                transient: !sender_fault || transient_code(&code),
                message: s("Message"),
                code,
            }
        })
        .collect()
}

/// The `Id`s of the `Successful` entries of a batch action's answer.
pub fn successful_ids(answer: &Value) -> Vec<&str> {
    answer
        .get("Successful")
        .and_then(Value::as_array)
        .map(|s| {
            s.iter()
                .filter_map(|e| e.get("Id").and_then(Value::as_str))
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn take(v: Value) -> Result<ConnKeys, ConfigError> {
        let mut m = v.as_object().unwrap().clone();
        ConnKeys::take(&mut m, "sink")
    }

    #[test]
    fn config_errors_name_the_key() {
        let key = |v: Value| take(v).unwrap_err().key;
        assert_eq!(key(json!({})), "sink.queue_url");
        assert_eq!(key(json!({"queue_url": "sqs://q"})), "sink.queue_url");
        assert_eq!(
            key(json!({"queue_url": "https://q/1/a", "endpoint": "q:1"})),
            "sink.endpoint"
        );
        assert_eq!(
            key(json!({"queue_url": "https://q/1/a", "access_key_id": "A"})),
            "sink.secret_access_key"
        );
        assert_eq!(
            key(json!({"queue_url": "https://q/1/a", "secret_access_key": "s"})),
            "sink.access_key_id"
        );
        assert_eq!(
            key(json!({"queue_url": "https://q/1/a", "session_token": "t"})),
            "sink.session_token"
        );
        assert_eq!(
            key(json!({"queue_url": "https://q/1/a", "timeout_ms": 0})),
            "sink.timeout_ms"
        );
        assert_eq!(
            key(json!({"queue_url": "https://q/1/a", "region": ""})),
            "sink.region"
        );
        let mut m = json!({"queue_url": "${ENV:Q}", "batch": 1})
            .as_object()
            .unwrap()
            .clone();
        assert!(ConnKeys::take(&mut m, "source").is_ok());
        let secret = take(json!({"queue_url": "https://q/1/a", "access_key_id": "A",
                                 "secret_access_key": "hunter2", "session_token": "tok3n"}))
        .unwrap();
        let shown = format!("{secret:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("tok3n"),
            "{shown}"
        );
        assert!(m.contains_key("batch") && !m.contains_key("queue_url"));
    }

    #[test]
    fn region_and_endpoint_come_from_the_queue_url() {
        assert_eq!(
            region_of("https://sqs.eu-west-1.amazonaws.com/123/q").as_deref(),
            Some("eu-west-1")
        );
        assert_eq!(
            region_of("https://us-east-2.queue.amazonaws.com/123/q").as_deref(),
            Some("us-east-2")
        );
        assert_eq!(region_of("http://127.0.0.1:4566/123/q"), None);
        assert_eq!(
            authority("http://127.0.0.1:4566/123/q"),
            Some("127.0.0.1:4566")
        );
        let keys = take(
            json!({"queue_url": "http://127.0.0.1:9/1/q.fifo", "region": "r",
                               "access_key_id": "AK", "secret_access_key": "SECRET"}),
        )
        .unwrap();
        let c = Client::open(&keys, "p", "sink").unwrap();
        assert_eq!(c.url, "http://127.0.0.1:9/");
        assert!(c.is_fifo());
        let headers = c
            .sign(
                c.creds.get().unwrap(),
                "AmazonSQS.SendMessage",
                "application/x-amz-json-1.0",
                b"{}",
            )
            .unwrap();
        let auth = &headers
            .iter()
            .find(|(k, _)| k == "authorization")
            .unwrap()
            .1;
        assert!(
            auth.starts_with("AWS4-HMAC-SHA256 Credential=AK/"),
            "{auth}"
        );
        assert!(auth.contains("/r/sqs/aws4_request"), "{auth}");
        assert!(
            auth.contains("SignedHeaders=content-type;host;x-amz-date;x-amz-target"),
            "{auth}"
        );
        assert!(!auth.contains("SECRET"));
    }

    #[test]
    fn batch_answers_are_read() {
        let a = json!({"Successful": [{"Id": "0"}], "Failed": [
            {"Id": "1", "Code": "InvalidMessageContents", "Message": "bad", "SenderFault": true},
            {"Id": "2", "Code": "InternalError", "Message": "oops", "SenderFault": false},
            {"Id": "3", "Code": "KmsThrottled", "Message": "slow", "SenderFault": true}]});
        assert_eq!(successful_ids(&a), vec!["0"]);
        let f = failed_entries(&a);
        assert_eq!(
            f.iter()
                .map(|e| (e.id.as_str(), e.transient))
                .collect::<Vec<_>>(),
            vec![("1", false), ("2", true), ("3", true)]
        );
    }
}
