//! The one error type of the relay: a message for the operator, a class
//! that tells the pipeline loop what to do about it, and the cause.
//!
//! The message is whole: it names the pipeline, the key or the object, and
//! says what the cause said (so a log line needs nothing else). The cause
//! itself stays reachable through [`std::error::Error::source`], for code
//! that walks the chain or asks what kind of failure it was.

use std::fmt;

/// What the pipeline loop should do about an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Connection lost, server restarting, timeout: retry forever.
    Transient,
    /// Retrying the same thing gives the same error (missing outbox,
    /// unsupported payload). A daemon retries slowly, `--once` gives up.
    Permanent,
    /// The destination went away for good (stdout closed): stop quietly.
    Closed,
}

/// The cause of an error.
type Cause = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A relay error: a message for the operator, its class and its cause.
#[derive(Debug)]
pub struct Error {
    /// What went wrong, naming the object involved (and what the cause said).
    pub msg: String,
    /// Whether and how to retry.
    pub class: Class,
    /// The underlying error, if there is one.
    cause: Option<Cause>,
}

impl Error {
    /// An error of `class`.
    pub fn new(class: Class, msg: impl Into<String>) -> Error {
        Error {
            msg: msg.into(),
            class,
            cause: None,
        }
    }

    /// A transient error.
    pub fn transient(msg: impl Into<String>) -> Error {
        Error::new(Class::Transient, msg)
    }

    /// A permanent error.
    pub fn permanent(msg: impl Into<String>) -> Error {
        Error::new(Class::Permanent, msg)
    }

    /// Record `cause` as the error behind this one (the message is left as
    /// it is: say what the cause said in it).
    pub fn caused_by(mut self, cause: impl std::error::Error + Send + Sync + 'static) -> Error {
        self.cause = Some(Box::new(cause));
        self
    }

    /// Prefix the message with context.
    pub fn context(mut self, what: impl fmt::Display) -> Error {
        self.msg = format!("{what}: {}", self.msg);
        self
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.msg)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.cause
            .as_deref()
            .map(|c| c as &(dyn std::error::Error + 'static))
    }
}

impl From<postgres::Error> for Error {
    fn from(e: postgres::Error) -> Error {
        let transient = e.is_closed()
            || match e.code() {
                Some(code) => transient_sqlstate(code.code()),
                // No SQLSTATE: an I/O or protocol error on the socket.
                None => true,
            };
        let msg = match e.as_db_error() {
            Some(db) => db.message().to_string(),
            None => {
                // Name the cause too: "error performing TLS handshake: ...".
                match std::error::Error::source(&e) {
                    Some(c) if !e.to_string().contains(&c.to_string()) => format!("{e}: {c}"),
                    _ => e.to_string(),
                }
            }
        };
        let class = if transient {
            Class::Transient
        } else {
            Class::Permanent
        };
        Error::new(class, format!("PostgreSQL: {msg}")).caused_by(e)
    }
}

/// Whether an error with this SQLSTATE goes away by itself: 08 connection
/// exceptions; 57P0x shutdown, crash recovery, cannot connect now; 57014 a
/// statement timeout or cancel; 55P03 a lock timeout; 53 insufficient
/// resources; 40 retryable rollbacks (serialization, deadlock); 25006 a
/// read-only transaction (connected to a standby during a failover); 58
/// system and I/O errors of the server.
fn transient_sqlstate(c: &str) -> bool {
    ["08", "57P", "53", "40", "58"]
        .iter()
        .any(|p| c.starts_with(p))
        || matches!(c, "57014" | "55P03" | "25006")
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Error {
        let class = if e.kind() == std::io::ErrorKind::BrokenPipe {
            Class::Closed
        } else {
            Class::Transient
        };
        Error::new(class, e.to_string()).caused_by(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    #[test]
    fn timeouts_and_failovers_are_transient_and_bad_data_is_not() {
        for c in [
            "08006", "57P01", "57014", "55P03", "53300", "40001", "25006", "58030",
        ] {
            assert!(transient_sqlstate(c), "{c}");
        }
        for c in ["23505", "22P02", "42P01", "42501", "54000", "P0001"] {
            assert!(!transient_sqlstate(c), "{c}");
        }
    }

    #[test]
    fn the_cause_is_kept_under_context_and_a_closed_pipe_is_closed() {
        let io = std::io::Error::new(std::io::ErrorKind::BrokenPipe, "pipe gone");
        let e = Error::from(io).context("writing to stdout");
        assert_eq!(e.class, Class::Closed);
        assert_eq!(e.to_string(), "writing to stdout: pipe gone");
        let cause = e.source().expect("a cause");
        let io = cause
            .downcast_ref::<std::io::Error>()
            .expect("an io::Error");
        assert_eq!(io.kind(), std::io::ErrorKind::BrokenPipe);
        let reset = Error::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert_eq!(reset.class, Class::Transient);
        assert!(Error::permanent("bad").source().is_none());
    }
}
