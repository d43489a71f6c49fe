//! Redis connections shared by the `redis` sink and source: the URL
//! (`redis://` or `redis+unix://`; `rediss://` is not built in), opening
//! the client, and which failures are transient.

use std::time::Duration;

use redis::Connection;

use crate::keys::{blame, ConfigError};
use crate::pg::{expand_env, mask};
use crate::retry::Error;

/// Connect, read and write timeout (a blocking read waits for its `BLOCK`
/// plus this).
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// Check a `url` key: the error says what is expected, without the
/// password.
pub fn check_url(url: &str) -> Result<(), String> {
    if url.starts_with("redis://") || url.starts_with("redis+unix://") {
        Ok(())
    } else {
        Err(format!(
            "expected redis://[user:password@]host[:port][/db], found {:?}",
            mask(url)
        ))
    }
}

/// The client for the `url` key of the `side` (`sink` or `source`) of
/// `pipeline` (`${ENV:NAME}` expanded), and the URL with its password
/// masked, for messages. It connects when asked to.
pub fn client(pipeline: &str, side: &str, url: &str) -> Result<(redis::Client, String), Error> {
    let refused = |e: String| Error::permanent(format!("pipeline {pipeline:?}: {side}.url: {e}"));
    let expanded = expand_env(url).map_err(|e| refused(e.to_string()))?;
    check_url(&expanded).map_err(refused)?;
    let client = redis::Client::open(expanded.as_str()).map_err(|e| {
        Error::permanent(format!(
            "pipeline {pipeline:?}: {side}.url {}: {e}",
            mask(url)
        ))
    })?;
    Ok((client, mask(&expanded)))
}

/// A connection of `client` (the server `shown`) with [`TIMEOUT`] to
/// connect, read and write.
pub fn connect(client: &redis::Client, shown: &str) -> Result<Connection, Error> {
    let c = client
        .get_connection_with_timeout(TIMEOUT)
        .map_err(|e| error(shown, &e))?;
    c.set_read_timeout(Some(TIMEOUT))
        .map_err(|e| error(shown, &e))?;
    c.set_write_timeout(Some(TIMEOUT))
        .map_err(|e| error(shown, &e))?;
    Ok(c)
}

/// What `check` does for the redis sink or source (`side`): connect to
/// `url` (with the password, if any) and PING; an error names
/// `<side>.url`.
pub fn ping(side: &str, url: &str) -> Result<(), ConfigError> {
    let key = format!("{side}.url");
    let url = expand_env(url).map_err(|e| blame(&key, e))?;
    let shown = mask(&url);
    let fail = |e: redis::RedisError| ConfigError::new(&key, format!("redis {shown}: {e}"));
    let client = redis::Client::open(url.as_str()).map_err(fail)?;
    let mut conn = connect(&client, &shown).map_err(|e| ConfigError::new(&key, e.msg))?;
    redis::cmd("PING")
        .query::<String>(&mut conn)
        .map_err(fail)?;
    Ok(())
}

/// A server error that goes away by itself (loading, out of memory, a
/// failover in progress).
pub fn transient_code(code: &str) -> bool {
    matches!(
        code,
        "LOADING" | "BUSY" | "OOM" | "TRYAGAIN" | "CLUSTERDOWN" | "MASTERDOWN" | "READONLY"
    )
}

/// Classify a failed round trip with the server `shown`: a lost
/// connection, a server error that goes away by itself, and a missing
/// consumer group (recreated on the next connection) are transient;
/// authentication, a key of another type and the like are permanent
/// (retrying cannot help until someone acts, so a daemon retries slowly).
pub fn error(shown: &str, e: &redis::RedisError) -> Error {
    let msg = format!("redis {shown}: {e}");
    match e.code() {
        Some("NOGROUP") => Error::transient(msg),
        Some(code) if !transient_code(code) && !e.is_io_error() && !e.is_connection_dropped() => {
            Error::permanent(msg)
        }
        _ => Error::transient(msg),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_redis_ones_and_errors_hide_the_password() {
        assert!(check_url("redis://h:6379/0").is_ok());
        assert!(check_url("redis+unix:///run/redis.sock").is_ok());
        let e = check_url("rediss://u:secret@h").unwrap_err();
        assert!(
            e.contains("expected redis://") && !e.contains("secret"),
            "{e}"
        );
    }

    #[test]
    fn server_errors_that_pass_are_transient() {
        assert!(transient_code("LOADING") && transient_code("READONLY"));
        assert!(!transient_code("WRONGTYPE") && !transient_code("NOAUTH"));
    }
}
