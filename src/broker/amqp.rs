//! AMQP 0-9-1 connections shared by the `rabbitmq` sink and source: the
//! URL, our own TCP socket, TLS, error classes, and the exchange both may
//! declare (its `exchange_type`).
//!
//! URL (the `url` key of both): `amqp://[user[:password]@]host[:port][/vhost]
//! [?heartbeat=S&connection_timeout=MS]`, or `amqps://` for TLS (checked
//! against the system's CA store). As in RabbitMQ's URI spec the port
//! defaults to 5672 (5671 for `amqps`), user and password to
//! `guest`/`guest`, and the vhost to `/`; user, password and vhost are
//! percent-decoded (the vhost `/` is written `%2f`). `heartbeat` defaults
//! to 30 s, `connection_timeout` (TCP connect and AMQP handshake) to
//! 10,000 ms. `${ENV:NAME}` is expanded by the caller before parsing.
//!
//! The socket is opened here, not by amiquip, because amiquip never sets
//! TCP_NODELAY: every publish/confirm round trip would then wait for
//! Nagle's algorithm (about 30 messages/s).

use std::net::ToSocketAddrs;
use std::time::Duration;

use amiquip::{
    Auth, Channel, Connection, ConnectionOptions, ConnectionTuning, ExchangeDeclareOptions,
    ExchangeType,
};

use crate::keys::ConfigError;
use crate::pg::{expand_env, mask};
use crate::retry::Error;

/// The largest frame the relay agrees to (RabbitMQ's default): the
/// negotiated `frame_max` is at most this. A message's content header
/// (its properties and headers) must fit in one frame.
pub const FRAME_MAX: u32 = 131_072;

/// A parsed `amqp://` or `amqps://` URL.
#[derive(Debug, Clone, PartialEq)]
pub struct AmqpUrl {
    tls: bool,
    host: String,
    port: u16,
    user: String,
    password: String,
    vhost: String,
    heartbeat: u16,
    timeout: Duration,
    /// The URL with its password masked, for messages.
    pub shown: String,
}

/// `%xx` escapes decoded.
fn percent_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent escape in {s:?}"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{s:?} is not UTF-8 once decoded"))
}

impl AmqpUrl {
    /// Parse a URL; the error says what is wrong (without the password).
    pub fn parse(url: &str) -> Result<AmqpUrl, String> {
        let shown = mask(url);
        let (tls, rest) = if let Some(r) = url.strip_prefix("amqp://") {
            (false, r)
        } else if let Some(r) = url.strip_prefix("amqps://") {
            (true, r)
        } else {
            return Err(format!(
                "expected amqp://[user:password@]host[:port][/vhost] (or amqps://), found {shown:?}"
            ));
        };
        let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let (user, password) = match userinfo {
            None => ("guest".to_string(), "guest".to_string()),
            Some(u) => match u.split_once(':') {
                Some((n, p)) => (percent_decode(n)?, percent_decode(p)?),
                None => (percent_decode(u)?, String::new()),
            },
        };
        let default_port = if tls { 5671 } else { 5672 };
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (h, after) = v6
                .split_once(']')
                .ok_or_else(|| format!("unclosed '[' in the host of {shown:?}"))?;
            match after.strip_prefix(':') {
                Some(p) => (h.to_string(), Some(p)),
                None if after.is_empty() => (h.to_string(), None),
                None => return Err(format!("bad host in {shown:?}")),
            }
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), Some(p)),
                None => (hostport.to_string(), None),
            }
        };
        if host.is_empty() {
            return Err(format!("no host in {shown:?}"));
        }
        let port = match port {
            None => default_port,
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| format!("bad port {p:?} in {shown:?}"))?,
        };
        let vhost = if path.is_empty() {
            "/".to_string()
        } else {
            percent_decode(path)?
        };
        let mut heartbeat = 30u16;
        let mut timeout = Duration::from_secs(10);
        for kv in query.split('&').filter(|kv| !kv.is_empty()) {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            match k {
                "heartbeat" => {
                    heartbeat = v
                        .parse()
                        .map_err(|_| format!("heartbeat={v:?}: expected seconds (0-65535)"))?
                }
                "connection_timeout" => {
                    let ms: u64 = v.parse().ok().filter(|ms| *ms > 0).ok_or_else(|| {
                        format!("connection_timeout={v:?}: expected milliseconds")
                    })?;
                    timeout = Duration::from_millis(ms);
                }
                other => {
                    return Err(format!(
                        "unknown URL parameter {other:?} (known: heartbeat, connection_timeout)"
                    ))
                }
            }
        }
        Ok(AmqpUrl {
            tls,
            host,
            port,
            user,
            password,
            vhost,
            heartbeat,
            timeout,
            shown,
        })
    }

    /// Check the `url` key `key` (e.g. `sink.url`) when the pipeline is
    /// loaded; a URL from the environment is checked when it opens.
    pub fn check(key: &str, url: &str) -> Result<(), ConfigError> {
        if url.is_empty() {
            return Err(ConfigError::new(key, "must not be empty"));
        }
        if !url.contains("${") {
            AmqpUrl::parse(url).map_err(|m| ConfigError::new(key, m))?;
        }
        Ok(())
    }

    /// The URL of key `key` of `pipeline` as it opens: `${ENV:NAME}`
    /// expanded, then parsed; an error names the pipeline and the key.
    pub fn resolve(pipeline: &str, key: &str, url: &str) -> Result<AmqpUrl, Error> {
        let refused = |e: String| Error::permanent(format!("pipeline {pipeline:?}: {key}: {e}"));
        AmqpUrl::parse(&expand_env(url).map_err(|e| refused(e.to_string()))?).map_err(refused)
    }

    /// Open a connection named `name` (shown in the broker's connection list).
    pub fn connect(&self, name: &str) -> Result<Connection, Error> {
        let addrs: Vec<_> = (self.host.as_str(), self.port)
            .to_socket_addrs()
            .map_err(|e| {
                Error::transient(format!("rabbitmq {}: resolving the host: {e}", self.shown))
            })?
            .collect();
        let mut last = None;
        let mut socket = None;
        for addr in &addrs {
            match std::net::TcpStream::connect_timeout(addr, self.timeout) {
                Ok(s) => {
                    socket = Some(s);
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        let Some(socket) = socket else {
            return Err(Error::transient(format!(
                "rabbitmq {}: connecting: {}",
                self.shown,
                last.map_or_else(|| "no address".to_string(), |e| e.to_string())
            )));
        };
        let io = |e: std::io::Error| Error::transient(format!("rabbitmq {}: {e}", self.shown));
        socket.set_nodelay(true).map_err(io)?;
        let stream = mio::net::TcpStream::from_stream(socket).map_err(io)?;
        let options = ConnectionOptions::default()
            .auth(Auth::Plain {
                username: self.user.clone(),
                password: self.password.clone(),
            })
            .virtual_host(self.vhost.clone())
            .heartbeat(self.heartbeat)
            .frame_max(FRAME_MAX)
            .connection_timeout(Some(self.timeout))
            .information(Some(name.to_string()));
        // A deeper queue into the I/O thread than the default 16: a publish
        // is three messages (method, header, body).
        let tuning = ConnectionTuning::default().mem_channel_bound(1024);
        let opened = if self.tls {
            let connector = native_tls::TlsConnector::new().map_err(|e| {
                Error::permanent(format!("rabbitmq {}: TLS setup: {e}", self.shown))
            })?;
            Connection::open_tls_stream(connector, &self.host, stream, options, tuning)
        } else {
            Connection::insecure_open_stream(stream, options, tuning)
        };
        opened.map_err(|e| error(&self.shown, &e))
    }
}

/// Classify an amiquip error: refused credentials, a missing vhost, exchange
/// or queue, and inequivalent declarations are permanent (retried slowly by
/// a daemon, fatal with `--once`); a lost connection is transient.
pub fn error(shown: &str, e: &amiquip::Error) -> Error {
    use amiquip::Error as E;
    let permanent = match e {
        E::InvalidCredentials
        | E::UnsupportedAuthMechanism { .. }
        | E::TlsHandshake { .. }
        | E::CreateTlsConnector { .. } => true,
        // 403 ACCESS_REFUSED, 530 NOT_ALLOWED (e.g. no such vhost).
        E::ServerClosedConnection { code, .. } => matches!(code, 403 | 530),
        // 403 ACCESS_REFUSED, 404 NOT_FOUND, 406 PRECONDITION_FAILED.
        E::ServerClosedChannel { code, .. } => matches!(code, 403 | 404 | 406),
        _ => false,
    };
    let msg = format!("rabbitmq {shown}: {e}");
    if permanent {
        Error::permanent(msg)
    } else {
        Error::transient(msg)
    }
}

/// An error about a config key (`key`, e.g. `sink.exchange`) of
/// `pipeline`: a refusal by the broker names the pipeline, the key and
/// `what`; anything else is the plain error (see [`error`]).
pub fn named(pipeline: &str, shown: &str, key: &str, e: &amiquip::Error, what: String) -> Error {
    match channel_code(e) {
        Some((code, text)) => Error::permanent(format!(
            "pipeline {pipeline:?}: {key}: {what} (rabbitmq {shown}: {code} {text})"
        )),
        None => error(shown, e),
    }
}

/// Check an `exchange_type` key: a built-in type, or a plugin's `x-...`.
pub fn check_exchange_type(kind: &str) -> Result<(), String> {
    if ["direct", "fanout", "topic", "headers"].contains(&kind) || kind.starts_with("x-") {
        Ok(())
    } else {
        Err(format!(
            "expected direct, fanout, topic, headers or x-..., found {kind:?}"
        ))
    }
}

/// Declare the durable exchange `name` of type `kind` (checked by
/// [`check_exchange_type`]) on `channel`.
pub fn declare_exchange(channel: &Channel, kind: &str, name: &str) -> Result<(), amiquip::Error> {
    let kind = match kind {
        "direct" => ExchangeType::Direct,
        "fanout" => ExchangeType::Fanout,
        "topic" => ExchangeType::Topic,
        "headers" => ExchangeType::Headers,
        other => ExchangeType::Custom(other.to_string()),
    };
    let opts = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    channel.exchange_declare(kind, name, opts).map(drop)
}

/// The AMQP reply code of a closed channel, if that is what `e` is.
pub fn channel_code(e: &amiquip::Error) -> Option<(u16, &str)> {
    match e {
        amiquip::Error::ServerClosedChannel { code, message, .. } => Some((*code, message)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls_like_rabbitmq() {
        let u = AmqpUrl::parse("amqp://relay:p%40ss@mq.example:5673/%2fprod?heartbeat=5").unwrap();
        assert_eq!(
            (
                u.tls,
                u.host.as_str(),
                u.port,
                u.user.as_str(),
                u.password.as_str(),
                u.vhost.as_str(),
                u.heartbeat
            ),
            (false, "mq.example", 5673, "relay", "p@ss", "/prod", 5)
        );
        assert_eq!(
            u.shown,
            "amqp://relay:***@mq.example:5673/%2fprod?heartbeat=5"
        );
        let d = AmqpUrl::parse("amqps://mq").unwrap();
        assert_eq!(
            (d.tls, d.port, d.user.as_str(), d.vhost.as_str()),
            (true, 5671, "guest", "/")
        );
        let v6 = AmqpUrl::parse("amqp://[::1]:5700/").unwrap();
        assert_eq!(
            (v6.host.as_str(), v6.port, v6.vhost.as_str()),
            ("::1", 5700, "/")
        );
    }

    #[test]
    fn bad_urls_say_why_without_the_password() {
        let e = AmqpUrl::parse("http://u:secret@x").unwrap_err();
        assert!(
            e.contains("expected amqp://") && !e.contains("secret"),
            "{e}"
        );
        assert!(AmqpUrl::parse("amqp://x:0").unwrap_err().contains("port"));
        assert!(AmqpUrl::parse("amqp://x?frame_max=1")
            .unwrap_err()
            .contains("frame_max"));
        assert!(AmqpUrl::parse("amqp:///vh")
            .unwrap_err()
            .contains("no host"));
        assert!(AmqpUrl::parse("amqp://x/%zz")
            .unwrap_err()
            .contains("percent"));
    }

    #[test]
    fn exchange_types_are_the_built_in_ones_or_a_plugins() {
        for ok in ["direct", "fanout", "topic", "headers", "x-delayed-message"] {
            assert_eq!(check_exchange_type(ok), Ok(()));
        }
        let e = check_exchange_type("tpic").unwrap_err();
        assert!(
            e.contains("expected direct") && e.contains("\"tpic\""),
            "{e}"
        );
    }
}
