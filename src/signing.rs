//! Webhook signatures, shared by the `http` sink (signs) and the `http`
//! source (verifies). Two schemes:
//!
//! - `pgtrickle` (the default): `Pgtrickle-Timestamp: <unix seconds>` and
//!   `Pgtrickle-Signature: v1=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>`;
//!   the secret's bytes are the key.
//! - `standard_webhooks` ([Standard Webhooks](https://www.standardwebhooks.com/)):
//!   `webhook-id`, `webhook-timestamp` and `webhook-signature:
//!   v1,<base64 HMAC-SHA256(key, "<id>.<timestamp>.<body>")>`, where the
//!   key is the base64 secret after its optional `whsec_` prefix. A
//!   verifier accepts any of the space-separated signatures of the header
//!   (senders list several while they rotate secrets).

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};
use serde::Deserialize;
use sha2::Sha256;

/// Which signature headers a webhook carries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scheme {
    /// `Pgtrickle-Timestamp` and `Pgtrickle-Signature`.
    #[default]
    Pgtrickle,
    /// `webhook-id`, `webhook-timestamp` and `webhook-signature`.
    StandardWebhooks,
}

/// The HMAC key of `secret` under `scheme`, or why the secret is not one.
pub fn key(scheme: Scheme, secret: &str) -> Result<Vec<u8>, String> {
    match scheme {
        Scheme::Pgtrickle => Ok(secret.as_bytes().to_vec()),
        Scheme::StandardWebhooks => {
            let b64 = secret.strip_prefix("whsec_").unwrap_or(secret);
            match BASE64.decode(b64) {
                Ok(k) if !k.is_empty() => Ok(k),
                _ => Err("a standard_webhooks secret is base64, optionally after `whsec_`".into()),
            }
        }
    }
}

fn mac(key: &[u8], parts: &[&[u8]]) -> Hmac<Sha256> {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("any key length");
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            mac.update(b".");
        }
        mac.update(p);
    }
    mac
}

/// `Pgtrickle-Signature` for `body` signed at `timestamp`.
pub fn pgtrickle(key: &[u8], timestamp: &str, body: &[u8]) -> String {
    let bytes = mac(key, &[timestamp.as_bytes(), body])
        .finalize()
        .into_bytes();
    let mut hex = String::with_capacity(3 + bytes.len() * 2);
    hex.push_str("v1=");
    for b in bytes {
        hex.push_str(&format!("{b:02x}"));
    }
    hex
}

/// `webhook-signature` for message `id` with `body` signed at `timestamp`.
pub fn standard(key: &[u8], id: &str, timestamp: &str, body: &[u8]) -> String {
    let bytes = mac(key, &[id.as_bytes(), timestamp.as_bytes(), body])
        .finalize()
        .into_bytes();
    format!("v1,{}", BASE64.encode(bytes))
}

/// Whether one of the space-separated `v1,<base64>` signatures of
/// `header` signs `body` as message `id` at `timestamp` (compared in
/// constant time).
pub fn standard_matches(key: &[u8], id: &str, timestamp: &str, body: &[u8], header: &str) -> bool {
    header.split_ascii_whitespace().any(|sig| {
        let Some(b64) = sig.strip_prefix("v1,") else {
            return false;
        };
        let Ok(given) = BASE64.decode(b64) else {
            return false;
        };
        mac(key, &[id.as_bytes(), timestamp.as_bytes(), body])
            .verify_slice(&given)
            .is_ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The test vector the Standard Webhooks specification publishes (and
    /// its reference libraries test against): a receiver's library must
    /// accept what we send.
    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const TS: &str = "1614265330";
    const BODY: &[u8] = br#"{"test": 2432232314}"#;
    const SIG: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    #[test]
    fn standard_signature_reproduces_the_specifications_test_vector() {
        let k = key(Scheme::StandardWebhooks, SECRET).unwrap();
        assert_eq!(standard(&k, ID, TS, BODY), SIG);
        // The prefix is optional, as in the reference libraries.
        let bare = key(Scheme::StandardWebhooks, &SECRET[6..]).unwrap();
        assert_eq!(bare, k);
    }

    #[test]
    fn standard_verification_takes_any_listed_signature_and_nothing_else() {
        let k = key(Scheme::StandardWebhooks, SECRET).unwrap();
        assert!(standard_matches(&k, ID, TS, BODY, SIG));
        assert!(standard_matches(
            &k,
            ID,
            TS,
            BODY,
            &format!("v1,bm9wZQ== {SIG}")
        ));
        assert!(!standard_matches(&k, ID, TS, b"{\"test\": 1}", SIG));
        assert!(!standard_matches(&k, "msg_other", TS, BODY, SIG));
        assert!(!standard_matches(&k, ID, "1614265331", BODY, SIG));
        assert!(!standard_matches(
            &k,
            ID,
            TS,
            BODY,
            "v2,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        ));
        assert!(!standard_matches(&k, ID, TS, BODY, ""));
    }

    #[test]
    fn a_standard_secret_must_be_base64() {
        assert!(key(Scheme::StandardWebhooks, "whsec_not base64!").is_err());
        assert!(key(Scheme::StandardWebhooks, "whsec_").is_err());
        assert_eq!(key(Scheme::Pgtrickle, "s").unwrap(), b"s");
    }

    fn hex_hmac(key: &[u8], msg: &[u8]) -> String {
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key).unwrap();
        mac.update(msg);
        mac.finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    #[test]
    fn pgtrickle_signature_is_hex_hmac_of_timestamp_dot_body() {
        // RFC 4231, test case 2.
        assert_eq!(
            hex_hmac(b"Jefe", b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert_eq!(
            pgtrickle(b"s3cret", "1700000000", br#"[{"a":1}]"#),
            format!("v1={}", hex_hmac(b"s3cret", br#"1700000000.[{"a":1}]"#))
        );
    }
}
