//! What a sink and a source of the same broker share: the connection (URL
//! and credential checks, TLS, our own socket options), error classes, and
//! the broker's helpers both directions use. One file per broker, each
//! behind the Cargo feature of its client crate; the sinks (`src/sink/`)
//! and sources (`src/source/`) keep only what is theirs.

#[cfg(feature = "rabbitmq")]
pub mod amqp;
#[cfg(feature = "sqs")]
pub mod aws_credentials;
#[cfg(any(feature = "http", feature = "sqs"))]
pub mod http;
#[cfg(feature = "kafka")]
pub mod kafka;
#[cfg(feature = "nats")]
pub mod nats;
#[cfg(feature = "redis")]
pub mod redis;
#[cfg(feature = "sqs")]
pub mod sqs;
