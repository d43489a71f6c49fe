//! The AWS credential chain of the SQS client, end to end: the relay finds
//! its credentials in a profile file, through web identity (moto's STS),
//! from an ECS-style container endpoint and from EC2 instance metadata
//! (IMDSv2, a small fake endpoint of the test's own), renews temporary
//! ones before they expire, and signs with them: a proxy in front of moto
//! records the access key of every request.
#![cfg(feature = "sqs")]

mod support;

use std::collections::HashSet;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde_json::json;
use support::sqs::{Moto, Proxy, REGION};
use support::*;

/// Every variable of the chain, so the test's own environment cannot leak
/// into the relay.
const CHAIN_ENV: &[&str] = &[
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CONFIG_FILE",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_ARN",
    "AWS_ROLE_SESSION_NAME",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_STS",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
    "AWS_EC2_METADATA_DISABLED",
    "AWS_EC2_METADATA_SERVICE_ENDPOINT",
];

/// A relay for `url` with no credentials anywhere but what `env` sets
/// (HOME is an empty directory: no ~/.aws).
fn relay_with(url: &str, home: &Path, env: &[(&str, String)]) -> Command {
    let mut c = relay(url);
    for v in CHAIN_ENV {
        c.env_remove(v);
    }
    c.env("HOME", home)
        .env("AWS_REGION", REGION)
        .env("AWS_EC2_METADATA_DISABLED", "true");
    for (k, v) in env {
        c.env(k, v);
    }
    c
}

/// A queue behind a recording proxy, and a pipeline `fwd` sending to it
/// without keys of its own.
fn setup(db: &str) -> (String, String, Proxy) {
    let moto = Moto::shared();
    let queue = moto.client().create_queue(db, json!({}));
    let proxy = Proxy::start(&moto.endpoint());
    let url = outbox_pipeline(
        db,
        &json!({"type": "sqs", "queue_url": queue, "endpoint": proxy.endpoint()}),
    );
    (url, queue, proxy)
}

/// Publish `n` events and wait until the queue has received `total`.
fn deliver(url: &str, queue: &str, from: i64, n: i64, total: usize) {
    publish(url, from, n);
    let sqs = Moto::shared().client();
    wait_until(60, "the events in the queue", || {
        sqs.counts(queue).0 as usize >= total
    });
}

#[test]
fn keys_of_a_named_profile_in_the_shared_files() {
    let (url, queue, proxy) = setup("cred_profile");
    let home = temp_dir("cred_profile_home");
    let creds = home.join("credentials");
    std::fs::write(
        &creds,
        "[default]\naws_access_key_id = AKIDDEFAULT\naws_secret_access_key = d\n\n\
         [relay]\naws_access_key_id = AKIDPROFILE\naws_secret_access_key = s3cr3t-profile\n",
    )
    .unwrap();
    let r = Relay::spawn(&mut relay_with(
        &url,
        &home,
        &[
            ("AWS_SHARED_CREDENTIALS_FILE", creds.display().to_string()),
            ("AWS_PROFILE", "relay".into()),
        ],
    ));
    deliver(&url, &queue, 0, 5, 5);
    let keys: HashSet<String> = proxy.access_keys().into_iter().collect();
    assert_eq!(keys, HashSet::from(["AKIDPROFILE".to_string()]));
    let log = r.stderr();
    assert!(log.contains("AWS credentials from profile relay"), "{log}");
    assert!(!log.contains("s3cr3t-profile"), "{log}");

    // A profile that is nowhere is a config error naming it.
    let (url, _, _proxy) = setup("cred_profile_nowhere");
    let out = relay_with(
        &url,
        &home,
        &[
            ("AWS_SHARED_CREDENTIALS_FILE", creds.display().to_string()),
            ("AWS_PROFILE", "nowhere".into()),
        ],
    )
    .args(["--once", "--pipeline", "fwd"])
    .output()
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("\"nowhere\"") && err.contains("pipeline \"fwd\""),
        "{err}"
    );
}

#[test]
fn web_identity_is_exchanged_with_sts() {
    let (url, queue, proxy) = setup("cred_web_identity");
    let home = temp_dir("cred_web_home");
    let token = home.join("token");
    std::fs::write(&token, "eyJhbGciOiJSUzI1NiJ9.e30.c2lnbmF0dXJl\n").unwrap();
    let r = Relay::spawn(&mut relay_with(
        &url,
        &home,
        &[
            ("AWS_WEB_IDENTITY_TOKEN_FILE", token.display().to_string()),
            (
                "AWS_ROLE_ARN",
                "arn:aws:iam::123456789012:role/relay".into(),
            ),
            ("AWS_ENDPOINT_URL_STS", Moto::shared().endpoint()),
        ],
    ));
    deliver(&url, &queue, 0, 5, 5);
    let keys: HashSet<String> = proxy.access_keys().into_iter().collect();
    assert_eq!(keys.len(), 1, "{keys:?}");
    let key = keys.into_iter().next().unwrap();
    assert!(
        key.starts_with("ASIA"),
        "temporary credentials from STS: {key}"
    );
    let log = r.stderr();
    assert!(
        log.contains(
            "AWS credentials from web identity (role arn:aws:iam::123456789012:role/relay)"
        ),
        "{log}"
    );
}

/// A fake metadata server: EC2's IMDSv2 (`PUT /latest/api/token`, then
/// the role and its credentials with that token) and an ECS-style
/// container endpoint (`GET /creds` with an `Authorization` header). Each
/// credential it hands out has a new access key `<prefix><n>` and expires
/// `lifetime` from now.
struct Metadata {
    port: u16,
    handed_out: Arc<Mutex<Vec<String>>>,
    refused: Arc<Mutex<u32>>,
    server: Arc<tiny_http::Server>,
}

impl Metadata {
    fn start(lifetime: Duration) -> Metadata {
        let server = Arc::new(tiny_http::Server::http("127.0.0.1:0").unwrap());
        let port = server.server_addr().to_ip().unwrap().port();
        let handed_out: Arc<Mutex<Vec<String>>> = Arc::default();
        let refused: Arc<Mutex<u32>> = Arc::default();
        let (s, h, f) = (server.clone(), handed_out.clone(), refused.clone());
        std::thread::spawn(move || {
            while let Ok(mut req) = s.recv() {
                let mut body = String::new();
                let _ = req.as_reader().read_to_string(&mut body);
                let header = |name: &str| {
                    req.headers()
                        .iter()
                        .find(|x| x.field.as_str().as_str().eq_ignore_ascii_case(name))
                        .map(|x| x.value.as_str().to_string())
                };
                let url = req.url().to_string();
                let creds = |prefix: &str| {
                    let mut h = h.lock().unwrap();
                    let key = format!("{prefix}{}", h.len() + 1);
                    h.push(key.clone());
                    let expires = humantime::format_rfc3339_seconds(SystemTime::now() + lifetime);
                    json!({"Code": "Success", "Type": "AWS-HMAC", "AccessKeyId": key,
                           "SecretAccessKey": "s3cr3t-temporary", "Token": "session-token",
                           "Expiration": expires.to_string()})
                    .to_string()
                };
                let token_ok = header("X-aws-ec2-metadata-token").as_deref() == Some("imds-token");
                let (status, text) = match (req.method().as_str(), url.as_str()) {
                    ("PUT", "/latest/api/token")
                        if header("X-aws-ec2-metadata-token-ttl-seconds").is_some() =>
                    {
                        (200, "imds-token".to_string())
                    }
                    ("GET", u) if u.starts_with("/latest/meta-data/") && !token_ok => {
                        (401, String::new())
                    }
                    ("GET", "/latest/meta-data/iam/security-credentials/") => {
                        (200, "relay-role\n".to_string())
                    }
                    ("GET", "/latest/meta-data/iam/security-credentials/relay-role") => {
                        (200, creds("ASIAIMDS"))
                    }
                    ("GET", "/creds") if header("Authorization").as_deref() == Some("ecs-auth") => {
                        (200, creds("ASIAECS"))
                    }
                    _ => (404, String::new()),
                };
                if status == 401 || status == 404 {
                    *f.lock().unwrap() += 1;
                }
                let _ =
                    req.respond(tiny_http::Response::from_string(text).with_status_code(status));
            }
        });
        Metadata {
            port,
            handed_out,
            refused,
            server,
        }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Metadata {
    fn drop(&mut self) {
        self.server.unblock();
    }
}

#[test]
fn imdsv2_credentials_are_renewed_before_they_expire() {
    let (url, queue, proxy) = setup("cred_imds");
    let home = temp_dir("cred_imds_home");
    // Credentials for 20 s: renewed after about half of that.
    let md = Metadata::start(Duration::from_secs(20));
    let mut cmd = relay_with(
        &url,
        &home,
        &[("AWS_EC2_METADATA_SERVICE_ENDPOINT", md.endpoint())],
    );
    cmd.env_remove("AWS_EC2_METADATA_DISABLED");
    let r = Relay::spawn(&mut cmd);
    deliver(&url, &queue, 0, 5, 5);
    std::thread::sleep(Duration::from_secs(12));
    deliver(&url, &queue, 5, 5, 10);
    let used: Vec<String> = proxy.access_keys();
    let first = used.first().cloned().unwrap();
    let last = used.last().cloned().unwrap();
    assert_eq!(first, "ASIAIMDS1", "{used:?}");
    assert_ne!(last, first, "renewed before expiry: {used:?}");
    assert!(last.starts_with("ASIAIMDS"), "{used:?}");
    assert_eq!(
        *md.refused.lock().unwrap(),
        0,
        "every request had the IMDSv2 token"
    );
    let log = r.stderr();
    assert!(
        log.contains("AWS credentials from EC2 instance metadata"),
        "{log}"
    );
    assert!(!log.contains("s3cr3t-temporary"), "{log}");
    assert!(md.handed_out.lock().unwrap().len() >= 2);
}

#[test]
fn container_credentials_use_their_authorization_token() {
    let (url, queue, proxy) = setup("cred_ecs");
    let home = temp_dir("cred_ecs_home");
    let md = Metadata::start(Duration::from_secs(3600));
    let auth = home.join("auth");
    std::fs::write(&auth, "ecs-auth\n").unwrap();
    let r = Relay::spawn(&mut relay_with(
        &url,
        &home,
        &[
            (
                "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                format!("{}/creds", md.endpoint()),
            ),
            (
                "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
                auth.display().to_string(),
            ),
        ],
    ));
    deliver(&url, &queue, 0, 5, 5);
    let keys: HashSet<String> = proxy.access_keys().into_iter().collect();
    assert_eq!(keys, HashSet::from(["ASIAECS1".to_string()]));
    assert_eq!(*md.refused.lock().unwrap(), 0);
    assert!(r
        .stderr()
        .contains("AWS credentials from container credentials"));
}

#[test]
fn no_credentials_anywhere_is_a_config_error_naming_the_keys() {
    let (url, _queue, _proxy) = setup("cred_none");
    let home = temp_dir("cred_none_home");
    let out = relay_with(&url, &home, &[])
        .args(["--once", "--pipeline", "fwd"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("no AWS credentials") && err.contains("sink.access_key_id"),
        "{err}"
    );
}
