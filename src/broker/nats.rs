//! NATS connections shared by the `nats` sink and source: the URL (one
//! server or a comma-separated list; `tls://` for TLS) and `.creds` file,
//! reconnecting in the background, waiting for a lost connection, and
//! JetStream API requests and their error answers.

// The sync `nats` crate is deprecated upstream in favour of async-nats; it
// is used on purpose (no async runtime; see ARCHITECTURE.md).
#![allow(deprecated)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::keys::{ConfigError, Fallback, KeySpec};
use crate::pg::{expand_env, mask};
use crate::retry::{Class, Error};

/// The `credentials` key both directions take.
pub const CREDENTIALS_KEY: KeySpec = KeySpec::new(
    "credentials",
    "string",
    Fallback::Unset,
    "a NATS `.creds` file (JWT and NKey); `${ENV:NAME}` is replaced",
);

/// JetStream API requests.
const API_TIMEOUT: Duration = Duration::from_secs(5);
/// How often [`connect_waiting`] tries again.
pub const CONNECT_STEP: Duration = Duration::from_millis(100);

/// Connection state shared with the client's callbacks.
#[derive(Default)]
pub struct Link {
    /// Whether the client is connected now.
    pub connected: AtomicBool,
    /// Bumped on every reconnect.
    pub generation: AtomicU64,
}

/// A connection opened by [`connect`].
pub struct Client {
    /// The connection (it reconnects in the background, forever).
    pub nc: nats::Connection,
    /// Its state, kept up to date by the client's callbacks.
    pub link: Arc<Link>,
    /// The URL with its password masked, for messages.
    pub shown: String,
}

/// Whether `name` can name a JetStream stream or consumer (no `.`, `*`,
/// `>` or white space).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && !name.contains(|c: char| c == '.' || c == '*' || c == '>' || c.is_whitespace())
}

/// `name` as the JetStream `what` (`stream` or `consumer`) the key `key`
/// names: refused unless [`valid_name`].
pub fn check_name(key: &str, what: &str, name: &str) -> Result<(), ConfigError> {
    match valid_name(name) {
        true => Ok(()),
        false => Err(ConfigError::new(
            key,
            format!("{name:?} is not a JetStream {what} name (no '.', '*', '>' or spaces)"),
        )),
    }
}

/// The connection keys of the `side` (`sink` or `source`): `url` and, when
/// given, `credentials` must not be empty.
pub fn check_connection(
    side: &str,
    url: &str,
    credentials: Option<&str>,
) -> Result<(), ConfigError> {
    if url.is_empty() {
        return Err(ConfigError::new(format!("{side}.url"), "must not be empty"));
    }
    if credentials == Some("") {
        return Err(ConfigError::new(
            format!("{side}.credentials"),
            "must not be empty",
        ));
    }
    Ok(())
}

/// Connect to `url` (`${ENV:NAME}` expanded; one server or a comma-separated
/// list; `tls://` for TLS) with an optional `.creds` file, for the `side`
/// (`sink` or `source`) of `pipeline`: errors name the pipeline and key. A
/// server that does not answer is a transient error.
pub fn connect(
    pipeline: &str,
    side: &str,
    url: &str,
    credentials: Option<&str>,
) -> Result<Client, Error> {
    let expanded = expand_env(url)
        .map_err(|e| Error::permanent(format!("pipeline {pipeline:?}: {side}.url: {e}")))?;
    let shown = mask(&expanded);
    let link = Arc::new(Link::default());
    let mut opts = match credentials {
        Some(c) => {
            let path = expand_env(c).map_err(|e| {
                Error::permanent(format!("pipeline {pipeline:?}: {side}.credentials: {e}"))
            })?;
            if !std::path::Path::new(&path).is_file() {
                return Err(Error::permanent(format!(
                    "pipeline {pipeline:?}: {side}.credentials: no such file {path}"
                )));
            }
            nats::Options::with_credentials(path)
        }
        None => nats::Options::new(),
    };
    let (down, up) = (link.clone(), link.clone());
    opts = opts
        .with_name(&format!("pgtrickle-relay {pipeline}"))
        .max_reconnects(None)
        .reconnect_delay_callback(reconnect_delay)
        .disconnect_callback(move || down.connected.store(false, Ordering::SeqCst))
        .reconnect_callback(move || {
            up.generation.fetch_add(1, Ordering::SeqCst);
            up.connected.store(true, Ordering::SeqCst);
        });
    let nc = opts
        .connect(expanded.as_str())
        .map_err(|e| Error::transient(format!("nats {shown}: {e}")))?;
    link.connected.store(true, Ordering::SeqCst);
    Ok(Client { nc, link, shown })
}

/// How long the client waits before its `attempt`th try in a row to reach
/// a server: not at all before the first (the client calls this before
/// every try, also when it connects for the first time), then 200 ms.
fn reconnect_delay(attempt: usize) -> Duration {
    match attempt {
        0 => Duration::ZERO,
        _ => Duration::from_millis(200),
    }
}

/// [`connect`], trying again every [`CONNECT_STEP`] for up to `wait` while
/// the server does not answer: a session opened during an outage starts
/// at once when the server is back, instead of failing and waiting out the
/// pipeline's backoff. The last error after that.
pub fn connect_waiting(
    pipeline: &str,
    side: &str,
    url: &str,
    credentials: Option<&str>,
    wait: Duration,
) -> Result<Client, Error> {
    let until = Instant::now() + wait;
    loop {
        match connect(pipeline, side, url, credentials) {
            Err(e) if e.class == Class::Transient && Instant::now() + CONNECT_STEP < until => {
                log::debug!("{e}; connecting again in {CONNECT_STEP:?}");
                std::thread::sleep(CONNECT_STEP);
            }
            other => return other,
        }
    }
}

impl Client {
    /// Wait until the connection is up, at most until `until`; a
    /// transient error after that. Returns the connection generation.
    pub fn wait_connected(&self, until: Instant) -> Result<u64, Error> {
        while !self.link.connected.load(Ordering::SeqCst) {
            if Instant::now() >= until {
                return Err(Error::transient(format!(
                    "nats {}: not connected (reconnecting)",
                    self.shown
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(self.link.generation.load(Ordering::SeqCst))
    }

    /// A JetStream API request.
    pub fn api(&self, subject: &str, body: &[u8]) -> Result<Vec<u8>, Error> {
        match self.nc.request_timeout(subject, body, API_TIMEOUT) {
            Ok(m) if m.is_no_responders() => Err(Error::transient(format!(
                "nats {}: JetStream does not answer (is it enabled: nats-server -js?)",
                self.shown
            ))),
            Ok(m) => Ok(m.data),
            Err(e) => Err(Error::transient(format!(
                "nats {}: JetStream request {subject}: {e}",
                self.shown
            ))),
        }
    }
}

/// The `error` object of a JetStream API answer.
#[derive(Debug, Deserialize)]
pub struct ApiError {
    /// HTTP-like status (404, 503, ...).
    #[serde(default)]
    pub code: u16,
    /// JetStream's own error code (10059: stream not found, ...).
    #[serde(default)]
    pub err_code: u32,
    /// What went wrong.
    #[serde(default)]
    pub description: String,
}

impl ApiError {
    /// Whether the answer says that the stream does not exist.
    pub fn no_stream(&self) -> bool {
        self.code == 404 || self.err_code == 10059
    }
}

impl std::fmt::Display for ApiError {
    /// `<description> (code <code>, err_code <err_code>)`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (code {}, err_code {})",
            self.description, self.code, self.err_code
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_try_to_reach_a_server_does_not_wait() {
        // It cost every session 200 ms before its first event.
        assert_eq!(reconnect_delay(0), Duration::ZERO);
        assert_eq!(reconnect_delay(1), Duration::from_millis(200));
        assert_eq!(reconnect_delay(50), Duration::from_millis(200));
    }

    #[test]
    fn stream_and_consumer_names_have_no_subject_tokens() {
        assert!(valid_name("ORDERS_v1-x"));
        for bad in ["", "a.b", "a*", "a>", "a b"] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn api_errors_say_both_codes() {
        let e: ApiError = serde_json::from_str(
            r#"{"code":404,"err_code":10059,"description":"stream not found"}"#,
        )
        .unwrap();
        assert!(e.no_stream());
        assert_eq!(e.to_string(), "stream not found (code 404, err_code 10059)");
    }
}
