//! PostgreSQL connections: `${ENV:NAME}` expansion, TLS, sane timeouts, and
//! connection strings with the password masked for logs.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use postgres::tls::{MakeTlsConnect, TlsConnect};
use postgres::{Client, Socket};

use crate::error::Error;

/// Replace every `${ENV:NAME}` in `s` with the environment variable NAME,
/// and every `${CREDENTIAL:NAME}` with the systemd credential NAME (the file
/// `$CREDENTIALS_DIRECTORY/NAME`, without its trailing newline). The
/// error (permanent) names the reference, never a value.
pub fn expand_env(s: &str) -> Result<String, Error> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| Error::permanent(format!("unterminated ${{...}} in {:?}", mask(s))))?;
        let reference = &after[..end];
        let value = if let Some(name) = reference.strip_prefix("ENV:") {
            std::env::var(name).map_err(|e| {
                Error::permanent(format!(
                    "environment variable {name} (used as ${{ENV:{name}}}) is not set"
                ))
                .caused_by(e)
            })?
        } else if let Some(name) = reference.strip_prefix("CREDENTIAL:") {
            let dir = std::env::var("CREDENTIALS_DIRECTORY").map_err(|e| {
                Error::permanent(format!(
                    "${{CREDENTIAL:{name}}} needs $CREDENTIALS_DIRECTORY (systemd LoadCredential=)"
                ))
                .caused_by(e)
            })?;
            let path = std::path::Path::new(&dir).join(name);
            let text = std::fs::read_to_string(&path).map_err(|e| {
                Error::permanent(format!("reading credential {}: {e}", path.display())).caused_by(e)
            })?;
            text.trim_end_matches(['\n', '\r']).to_string()
        } else {
            // Not ours: keep it as written.
            out.push_str("${");
            rest = after;
            continue;
        };
        out.push_str(&value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// A connection string fit for logs: the password and secret-looking
/// parameters replaced by `***` (see [`crate::redact`]).
pub fn mask(url: &str) -> String {
    crate::redact::secrets(url)
}

/// TLS settings taken out of a connection string before the `postgres`
/// crate parses it (it knows neither `verify-*` modes nor `sslrootcert`).
#[derive(Debug, Default, Clone, PartialEq)]
struct TlsParams {
    /// `sslmode=verify-ca` or `verify-full`: check the certificate.
    verify: Option<&'static str>,
    /// `sslrootcert=<file>`: a CA to trust.
    root_cert: Option<String>,
}

/// Split our TLS parameters off `url` (URL or key=value form).
fn split_tls(url: &str) -> (String, TlsParams) {
    // The URL form keeps its parameters after `?`, joined by `&`; the
    // key=value form is all parameters, joined by spaces.
    let (base, params, sep) = if url.contains("://") {
        match url.split_once('?') {
            None => return (url.to_string(), TlsParams::default()),
            Some((base, query)) => (Some(base), query, "&"),
        }
    } else {
        (None, url, " ")
    };
    let mut tls = TlsParams::default();
    let mut kept: Vec<&str> = params
        .split(sep)
        .filter(|kv| !kv.is_empty())
        .filter(|kv| {
            match kv.split_once('=').unwrap_or((kv, "")) {
                ("sslmode", "verify-ca") => tls.verify = Some("verify-ca"),
                ("sslmode", "verify-full") => tls.verify = Some("verify-full"),
                ("sslrootcert", v) => tls.root_cert = Some(v.to_string()),
                _ => return true,
            }
            false
        })
        .collect();
    if tls.verify.is_some() {
        // The postgres crate knows no verify-*: TLS is required, and our
        // connector does the checking.
        kept.push("sslmode=require");
    }
    let rest = match base {
        Some(base) if kept.is_empty() => base.to_string(),
        Some(base) => format!("{base}?{}", kept.join("&")),
        None => kept.join(" "),
    };
    (rest, tls)
}

/// The TLS connector for `tls`, built once per process and shared: each
/// one holds the parsed system CA store (about 1.7 MB).
fn shared_connector(tls: &TlsParams) -> Result<native_tls::TlsConnector, Error> {
    type Key = (Option<&'static str>, Option<String>);
    static CACHE: std::sync::Mutex<Vec<(Key, native_tls::TlsConnector)>> =
        std::sync::Mutex::new(Vec::new());
    let key: Key = (tls.verify, tls.root_cert.clone());
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, c)) = cache.iter().find(|(k, _)| *k == key) {
        return Ok(c.clone());
    }
    let c = tls_connector(tls)?;
    cache.push((key, c.clone()));
    Ok(c)
}

/// The TLS of a connection, made only once the server agrees to TLS: the
/// connector parses the system CA store (tens of milliseconds at start-up),
/// which a server without TLS (`sslmode=prefer`, the default, answered
/// "no") or `sslmode=disable` never needs.
struct LazyTls(TlsParams);

/// The TLS handshake of [`LazyTls`].
struct LazyTlsConnect {
    tls: TlsParams,
    domain: String,
}

impl MakeTlsConnect<Socket> for LazyTls {
    type Stream = postgres_native_tls::TlsStream<Socket>;
    type TlsConnect = LazyTlsConnect;
    type Error = native_tls::Error;

    fn make_tls_connect(&mut self, domain: &str) -> Result<LazyTlsConnect, native_tls::Error> {
        Ok(LazyTlsConnect {
            tls: self.0.clone(),
            domain: domain.to_string(),
        })
    }
}

impl TlsConnect<Socket> for LazyTlsConnect {
    type Stream = postgres_native_tls::TlsStream<Socket>;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Stream, Self::Error>> + Send>>;

    fn connect(self, stream: Socket) -> Self::Future {
        match shared_connector(&self.tls) {
            Ok(c) => {
                let handshake =
                    postgres_native_tls::TlsConnector::new(c, &self.domain).connect(stream);
                Box::pin(async move { handshake.await.map_err(Into::into) })
            }
            Err(e) => Box::pin(std::future::ready(Err(e.msg.into()))),
        }
    }
}

/// A TLS connector with libpq's `sslmode` meaning: `prefer` and `require`
/// encrypt without checking the certificate, `verify-ca` checks it against
/// the trusted CAs (system ones plus `sslrootcert`), `verify-full` also
/// checks the host name.
fn tls_connector(tls: &TlsParams) -> Result<native_tls::TlsConnector, Error> {
    let mut b = native_tls::TlsConnector::builder();
    match tls.verify {
        None => {
            b.danger_accept_invalid_certs(true);
            b.danger_accept_invalid_hostnames(true);
        }
        Some("verify-ca") => {
            b.danger_accept_invalid_hostnames(true);
        }
        Some(_) => {}
    }
    if let Some(path) = &tls.root_cert {
        let pem = std::fs::read(path).map_err(|e| {
            Error::permanent(format!("reading sslrootcert {path}: {e}")).caused_by(e)
        })?;
        let cert = native_tls::Certificate::from_pem(&pem)
            .map_err(|e| Error::permanent(format!("sslrootcert {path}: {e}")).caused_by(e))?;
        b.add_root_certificate(cert);
    }
    b.build()
        .map_err(|e| Error::permanent(format!("TLS setup: {e}")).caused_by(e))
}

/// TCP keepalives of every session, set on both ends: a peer gone silent
/// (a host lost, a network partition) is given up after about
/// `KEEPALIVE_IDLE + KEEPALIVE_COUNT * KEEPALIVE_INTERVAL` = 25 s, and the
/// server then ends the session and frees its advisory locks (instead of
/// after the system's default of over 2 hours).
const KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
/// Between unanswered keepalive probes.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
/// Unanswered probes before the connection is given up.
const KEEPALIVE_COUNT: u32 = 3;
/// How long sent data may stay unacknowledged (keepalives do not probe
/// while data waits): the same 25 s.
const USER_TIMEOUT: Duration = Duration::from_secs(25);

/// Connect to PostgreSQL (TLS when the server offers it or `sslmode` asks
/// for it), tagging the session with `application_name`.
pub fn connect(url: &str, application_name: &str) -> Result<Client, Error> {
    let (rest, tls) = split_tls(url);
    let mut config: postgres::Config = rest.parse().map_err(|e| {
        Error::permanent(format!(
            "bad PostgreSQL connection string {}: {e}",
            mask(url)
        ))
        .caused_by(e)
    })?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(10));
    }
    config
        .keepalives(true)
        .keepalives_idle(KEEPALIVE_IDLE)
        .keepalives_interval(KEEPALIVE_INTERVAL)
        .keepalives_retries(KEEPALIVE_COUNT)
        .tcp_user_timeout(USER_TIMEOUT);
    if config.get_application_name().is_none() {
        config.application_name(application_name);
    }
    if tls.verify.is_some() {
        // A certificate to check: a bad sslrootcert is a config error,
        // said before connecting.
        shared_connector(&tls)?;
    }
    let mut client = config
        .connect(LazyTls(tls))
        .map_err(|e| Error::from(e).context(format!("connecting to {}", mask(url))))?;
    // The server's end of the socket (its keepalives are its own settings,
    // which a session may set; ignored on a Unix socket).
    client.batch_execute(&format!(
        "SET tcp_keepalives_idle = {}; SET tcp_keepalives_interval = {}; \
         SET tcp_keepalives_count = {KEEPALIVE_COUNT}; SET tcp_user_timeout = {}",
        KEEPALIVE_IDLE.as_secs(),
        KEEPALIVE_INTERVAL.as_secs(),
        USER_TIMEOUT.as_millis()
    ))?;
    Ok(client)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_passwords_in_both_forms() {
        assert_eq!(
            mask("postgres://relay:s3cr3t@db:5432/app"),
            "postgres://relay:***@db:5432/app"
        );
        assert_eq!(mask("postgres://relay@db/app"), "postgres://relay@db/app");
        assert_eq!(
            mask("host=db user=relay password=s3cr3t dbname=app"),
            "host=db user=relay password=*** dbname=app"
        );
        assert_eq!(
            mask("postgres://relay@db/app?password=s3cr3t"),
            "postgres://relay@db/app?password=***"
        );
    }

    #[test]
    fn takes_tls_parameters_out_of_both_forms() {
        let (rest, tls) =
            split_tls("postgres://u@h/d?sslmode=verify-full&sslrootcert=/ca.pem&connect_timeout=3");
        assert_eq!(rest, "postgres://u@h/d?connect_timeout=3&sslmode=require");
        assert_eq!(tls.verify, Some("verify-full"));
        assert_eq!(tls.root_cert.as_deref(), Some("/ca.pem"));
        let (rest, tls) = split_tls("host=h sslmode=require dbname=d");
        assert_eq!(rest, "host=h sslmode=require dbname=d");
        assert_eq!(tls, TlsParams::default());
        let (rest, tls) = split_tls("host=h sslmode=verify-ca");
        assert_eq!(
            (rest.as_str(), tls.verify),
            ("host=h sslmode=require", Some("verify-ca"))
        );
        assert_eq!(split_tls("postgres://u@h/d").0, "postgres://u@h/d");
    }

    #[test]
    fn expands_env_references() {
        std::env::set_var("PGTR_TEST_PW", "pw");
        assert_eq!(
            expand_env("postgres://u:${ENV:PGTR_TEST_PW}@h/d").unwrap(),
            "postgres://u:pw@h/d"
        );
        assert!(expand_env("x${ENV:PGTR_NOT_SET_EVER}")
            .unwrap_err()
            .msg
            .contains("PGTR_NOT_SET_EVER"));
        assert_eq!(expand_env("a${other}b").unwrap(), "a${other}b");
    }

    #[test]
    fn reads_systemd_credentials() {
        let dir = std::env::temp_dir().join(format!("pgtr-cred-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("pgpass"), "s3cret\n").unwrap();
        std::env::set_var("CREDENTIALS_DIRECTORY", &dir);
        assert_eq!(
            expand_env("postgres://u:${CREDENTIAL:pgpass}@h/d").unwrap(),
            "postgres://u:s3cret@h/d"
        );
        assert!(expand_env("${CREDENTIAL:missing}")
            .unwrap_err()
            .msg
            .contains("missing"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
