//! AWS credentials for the SQS client, found the way the AWS SDKs find
//! them, synchronously (no SDK, no async runtime), first match wins:
//!
//! 1. the pipeline's own keys (`access_key_id`, `secret_access_key`,
//!    `session_token`);
//! 2. the environment: `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
//!    `AWS_SESSION_TOKEN`;
//! 3. the shared files: the profile `AWS_PROFILE` (default `default`) of
//!    `AWS_SHARED_CREDENTIALS_FILE` (default `~/.aws/credentials`), then of
//!    `AWS_CONFIG_FILE` (default `~/.aws/config`, sections `[profile
//!    NAME]`), with static keys (`aws_access_key_id`,
//!    `aws_secret_access_key`, `aws_session_token`);
//! 4. web identity (EKS IRSA and the like): `AWS_WEB_IDENTITY_TOKEN_FILE`
//!    and `AWS_ROLE_ARN` (`AWS_ROLE_SESSION_NAME` optional), exchanged with
//!    STS `AssumeRoleWithWebIdentity` (endpoint: `AWS_ENDPOINT_URL_STS`,
//!    else `AWS_ENDPOINT_URL`, else `https://sts.<region>.amazonaws.com`);
//! 5. ECS container credentials: `AWS_CONTAINER_CREDENTIALS_RELATIVE_URI`
//!    (on `http://169.254.170.2`) or `AWS_CONTAINER_CREDENTIALS_FULL_URI`,
//!    with `AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE` or
//!    `AWS_CONTAINER_AUTHORIZATION_TOKEN` as its `Authorization` header;
//! 6. EC2 instance metadata, IMDSv2 (a session token first), unless
//!    `AWS_EC2_METADATA_DISABLED=true`; endpoint
//!    `AWS_EC2_METADATA_SERVICE_ENDPOINT`, else `http://169.254.169.254`.
//!
//! Temporary credentials (4–6) are fetched again when less than 5 minutes
//! (or half their lifetime, if that is shorter) remain. Secrets never
//! appear in an error or a log line.

use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;
use serde_json::Value;

/// How long a metadata endpoint may take (it is local: a host without one
/// should not hold up the start).
const METADATA_TIMEOUT: Duration = Duration::from_secs(2);
/// Fetch again when less than this remains.
const REFRESH_BEFORE: Duration = Duration::from_secs(300);
const ECS_HOST: &str = "http://169.254.170.2";
const IMDS_HOST: &str = "http://169.254.169.254";

/// Where temporary credentials come from.
#[derive(Debug, Clone)]
enum Fetch {
    WebIdentity {
        token_file: String,
        role_arn: String,
        session_name: String,
        sts_url: String,
    },
    Container {
        url: String,
    },
    Instance {
        endpoint: String,
    },
}

/// Credentials that stay valid: fixed ones, or temporary ones fetched
/// again before they expire.
pub struct Provider {
    /// Where the credentials came from, for the log (no secrets).
    pub origin: String,
    fetch: Option<Fetch>,
    agent: ureq::Agent,
    /// The credentials and when to fetch new ones.
    current: Mutex<(Credentials, Option<SystemTime>)>,
}

impl std::fmt::Debug for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provider")
            .field("origin", &self.origin)
            .finish_non_exhaustive()
    }
}

/// Why no credentials could be had.
#[derive(Debug)]
pub enum CredentialError {
    /// None of the sources has any: a config problem.
    Missing(String),
    /// A source is there but failed (STS or a metadata endpoint down, a
    /// bad answer): may go away.
    Failed(String),
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn fixed(id: String, secret: String, token: Option<String>) -> Credentials {
    Credentials::new(id, secret, token, None, "pgtrickle-relay")
}

impl Provider {
    /// Find credentials in the order of the module doc; `keys` are the
    /// pipeline's own (id, secret, token), `region` the signing region
    /// (for the STS endpoint).
    pub fn find(
        keys: Option<(String, String, Option<String>)>,
        region: &str,
        agent: ureq::Agent,
    ) -> Result<Provider, CredentialError> {
        let fixed_provider = |origin: String, creds: Credentials| Provider {
            origin,
            fetch: None,
            agent: agent.clone(),
            current: Mutex::new((creds, None)),
        };
        if let Some((id, secret, token)) = keys {
            return Ok(fixed_provider(
                "the pipeline's keys".into(),
                fixed(id, secret, token),
            ));
        }
        if let (Some(id), Some(secret)) = (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY")) {
            return Ok(fixed_provider(
                "the environment".into(),
                fixed(id, secret, env("AWS_SESSION_TOKEN")),
            ));
        }
        if let Some((origin, creds)) = from_profile()? {
            return Ok(fixed_provider(origin, creds));
        }
        let (origin, fetch) = if let (Some(token_file), Some(role_arn)) =
            (env("AWS_WEB_IDENTITY_TOKEN_FILE"), env("AWS_ROLE_ARN"))
        {
            let sts = env("AWS_ENDPOINT_URL_STS")
                .or_else(|| env("AWS_ENDPOINT_URL"))
                .unwrap_or_else(|| format!("https://sts.{region}.amazonaws.com"));
            (
                format!("web identity (role {role_arn})"),
                Fetch::WebIdentity {
                    token_file,
                    session_name: env("AWS_ROLE_SESSION_NAME")
                        .unwrap_or_else(|| "pgtrickle-relay".into()),
                    role_arn,
                    sts_url: format!("{}/", sts.trim_end_matches('/')),
                },
            )
        } else if let Some(rel) = env("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI") {
            (
                "ECS container credentials".into(),
                Fetch::Container {
                    url: format!("{ECS_HOST}{rel}"),
                },
            )
        } else if let Some(url) = env("AWS_CONTAINER_CREDENTIALS_FULL_URI") {
            ("container credentials".into(), Fetch::Container { url })
        } else if env("AWS_EC2_METADATA_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
            return Err(CredentialError::Missing(
                "no AWS credentials: not in the pipeline's keys, the environment \
                 (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY), the shared files, web identity \
                 or container settings, and instance metadata is disabled"
                    .into(),
            ));
        } else {
            let endpoint =
                env("AWS_EC2_METADATA_SERVICE_ENDPOINT").unwrap_or_else(|| IMDS_HOST.into());
            (
                "EC2 instance metadata".into(),
                Fetch::Instance {
                    endpoint: endpoint.trim_end_matches('/').to_string(),
                },
            )
        };
        let first = fetch.get(&agent);
        let (creds, expires) = match (first, &fetch) {
            (Ok(c), _) => c,
            // No metadata service at all: this is not an EC2 instance.
            (Err(CredentialError::Missing(why)), Fetch::Instance { .. }) => {
                return Err(CredentialError::Missing(format!(
                    "no AWS credentials: not in the pipeline's keys, the environment \
                     (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY), the shared files, web identity \
                     or container settings, and no EC2 instance metadata ({why})"
                )))
            }
            (Err(e), _) => return Err(e),
        };
        Ok(Provider {
            origin,
            fetch: Some(fetch),
            agent,
            current: Mutex::new((creds, expires.map(refresh_at))),
        })
    }

    /// Credentials to sign with now (fetched again if they are about to
    /// expire; if that fails while the old ones are still valid, the old
    /// ones).
    pub fn get(&self) -> Result<Credentials, CredentialError> {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        let (Some(fetch), Some(at)) = (&self.fetch, current.1) else {
            return Ok(current.0.clone());
        };
        if SystemTime::now() < at {
            return Ok(current.0.clone());
        }
        match fetch.get(&self.agent) {
            Ok((creds, expires)) => {
                *current = (creds, expires.map(refresh_at));
                Ok(current.0.clone())
            }
            Err(e) => {
                let still_valid = current
                    .0
                    .expiry()
                    .is_some_and(|exp| SystemTime::now() + Duration::from_secs(30) < exp);
                if still_valid {
                    log::warn!(
                        "renewing AWS credentials from {}: {}",
                        self.origin,
                        describe(&e)
                    );
                    Ok(current.0.clone())
                } else {
                    Err(e)
                }
            }
        }
    }
}

/// The text of a credential error.
pub fn describe(e: &CredentialError) -> &str {
    match e {
        CredentialError::Missing(s) | CredentialError::Failed(s) => s,
    }
}

/// When to fetch credentials that expire at `expires`.
fn refresh_at(expires: SystemTime) -> SystemTime {
    let left = expires
        .duration_since(SystemTime::now())
        .unwrap_or(Duration::ZERO);
    expires - REFRESH_BEFORE.min(left / 2)
}

impl Fetch {
    /// New temporary credentials and their expiry.
    fn get(
        &self,
        agent: &ureq::Agent,
    ) -> Result<(Credentials, Option<SystemTime>), CredentialError> {
        let failed = |what: &str, e: String| CredentialError::Failed(format!("{what}: {e}"));
        match self {
            Fetch::WebIdentity {
                token_file,
                role_arn,
                session_name,
                sts_url,
            } => {
                let token = std::fs::read_to_string(token_file)
                    .map_err(|e| failed("reading AWS_WEB_IDENTITY_TOKEN_FILE", e.to_string()))?;
                let form = [
                    ("Action", "AssumeRoleWithWebIdentity"),
                    ("Version", "2011-06-15"),
                    ("RoleArn", role_arn.as_str()),
                    ("RoleSessionName", session_name.as_str()),
                    ("WebIdentityToken", token.trim()),
                ];
                let what = format!("STS AssumeRoleWithWebIdentity at {sts_url}");
                let mut resp = agent
                    .post(sts_url)
                    .config()
                    .timeout_global(Some(Duration::from_secs(10)))
                    .build()
                    .send_form(form)
                    .map_err(|e| failed(&what, e.to_string()))?;
                let status = resp.status().as_u16();
                let body = resp
                    .body_mut()
                    .read_to_string()
                    .map_err(|e| failed(&what, e.to_string()))?;
                if status != 200 {
                    let code = xml_text(&body, "Code").unwrap_or_default();
                    return Err(failed(&what, format!("status {status} {code}")));
                }
                let field = |tag: &str| {
                    xml_text(&body, tag)
                        .ok_or_else(|| failed(&what, format!("no {tag} in the answer")))
                };
                let expires = expiry(&field("Expiration")?).map_err(|e| failed(&what, e))?;
                Ok((
                    Credentials::new(
                        field("AccessKeyId")?,
                        field("SecretAccessKey")?,
                        Some(field("SessionToken")?),
                        Some(expires),
                        "pgtrickle-relay",
                    ),
                    Some(expires),
                ))
            }
            Fetch::Container { url } => {
                let auth = match env("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE") {
                    Some(f) => Some(
                        std::fs::read_to_string(&f)
                            .map_err(|e| {
                                failed(
                                    "reading AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
                                    e.to_string(),
                                )
                            })?
                            .trim()
                            .to_string(),
                    ),
                    None => env("AWS_CONTAINER_AUTHORIZATION_TOKEN"),
                };
                let mut req = agent
                    .get(url)
                    .config()
                    .timeout_global(Some(METADATA_TIMEOUT))
                    .build();
                if let Some(a) = &auth {
                    req = req.header("Authorization", a);
                }
                let what = format!("container credentials at {}", crate::redact::secrets(url));
                json_credentials(&what, req.call())
            }
            Fetch::Instance { endpoint } => {
                let what = format!("EC2 instance metadata at {endpoint}");
                let mut resp = agent
                    .put(&format!("{endpoint}/latest/api/token"))
                    .config()
                    .timeout_global(Some(METADATA_TIMEOUT))
                    .build()
                    .header("X-aws-ec2-metadata-token-ttl-seconds", "21600")
                    .send_empty()
                    .map_err(|e| CredentialError::Missing(format!("{what}: {e}")))?;
                if resp.status().as_u16() != 200 {
                    // Refused (IMDSv2 off, or not ours to use): none here.
                    return Err(CredentialError::Missing(format!(
                        "{what}: token: status {}",
                        resp.status()
                    )));
                }
                let token = resp
                    .body_mut()
                    .read_to_string()
                    .map_err(|e| failed(&what, e.to_string()))?;
                let get = |path: &str| {
                    agent
                        .get(&format!(
                            "{endpoint}/latest/meta-data/iam/security-credentials/{path}"
                        ))
                        .config()
                        .timeout_global(Some(METADATA_TIMEOUT))
                        .build()
                        .header("X-aws-ec2-metadata-token", token.trim())
                        .call()
                };
                let mut roles = get("").map_err(|e| failed(&what, e.to_string()))?;
                if roles.status().as_u16() != 200 {
                    return Err(CredentialError::Missing(format!(
                        "{what}: no IAM role attached to this instance (status {})",
                        roles.status()
                    )));
                }
                let roles = roles
                    .body_mut()
                    .read_to_string()
                    .map_err(|e| failed(&what, e.to_string()))?;
                let role = roles.lines().next().unwrap_or("").trim().to_string();
                if role.is_empty() {
                    return Err(CredentialError::Missing(format!(
                        "{what}: no IAM role attached to this instance"
                    )));
                }
                json_credentials(&what, get(&role))
            }
        }
    }
}

/// Credentials from the JSON answer of a container or instance metadata
/// endpoint (`AccessKeyId`, `SecretAccessKey`, `Token`, `Expiration`).
fn json_credentials(
    what: &str,
    resp: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
) -> Result<(Credentials, Option<SystemTime>), CredentialError> {
    let failed = |e: String| CredentialError::Failed(format!("{what}: {e}"));
    let mut resp = resp.map_err(|e| failed(e.to_string()))?;
    if resp.status().as_u16() != 200 {
        return Err(failed(format!("status {}", resp.status())));
    }
    let text = resp
        .body_mut()
        .read_to_string()
        .map_err(|e| failed(e.to_string()))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| failed(format!("not JSON ({e})")))?;
    let field = |k: &str| {
        v.get(k)
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| failed(format!("no {k} in the answer")))
    };
    let expires = match v.get("Expiration").and_then(Value::as_str) {
        Some(e) => Some(expiry(e).map_err(failed)?),
        None => None,
    };
    Ok((
        Credentials::new(
            field("AccessKeyId")?,
            field("SecretAccessKey")?,
            v.get("Token").and_then(Value::as_str).map(str::to_string),
            expires,
            "pgtrickle-relay",
        ),
        expires,
    ))
}

/// An ISO 8601 / RFC 3339 time such as `2026-12-02T12:00:00Z`.
fn expiry(s: &str) -> Result<SystemTime, String> {
    humantime::parse_rfc3339_weak(s.trim()).map_err(|e| format!("Expiration {s:?}: {e}"))
}

/// The text of the first `<tag>…</tag>` of an XML answer (STS's answers
/// are small and flat where we read them).
fn xml_text(xml: &str, tag: &str) -> Option<String> {
    let open = format!("<{tag}>");
    let start = xml.find(&open)? + open.len();
    let end = xml[start..].find(&format!("</{tag}>"))? + start;
    Some(xml[start..end].trim().to_string())
}

/// Static keys of the profile `AWS_PROFILE` (or `default`) in the shared
/// credentials file, then in the config file.
fn from_profile() -> Result<Option<(String, Credentials)>, CredentialError> {
    let named = env("AWS_PROFILE");
    let profile = named.clone().unwrap_or_else(|| "default".into());
    let home = env("HOME").unwrap_or_default();
    let files = [
        (
            env("AWS_SHARED_CREDENTIALS_FILE")
                .unwrap_or_else(|| format!("{home}/.aws/credentials")),
            profile.clone(),
        ),
        (
            env("AWS_CONFIG_FILE").unwrap_or_else(|| format!("{home}/.aws/config")),
            if profile == "default" {
                profile.clone()
            } else {
                format!("profile {profile}")
            },
        ),
    ];
    let mut seen = false;
    for (file, section) in &files {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        let Some(keys) = ini_section(&text, section) else {
            continue;
        };
        seen = true;
        let get = |k: &str| {
            keys.iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
                .filter(|v| !v.is_empty())
        };
        if let (Some(id), Some(secret)) = (get("aws_access_key_id"), get("aws_secret_access_key")) {
            return Ok(Some((
                format!("profile {profile} of {file}"),
                fixed(id, secret, get("aws_session_token")),
            )));
        }
    }
    match named {
        Some(p) if !seen => Err(CredentialError::Missing(format!(
            "AWS_PROFILE names profile {p:?}, which neither {} nor {} has",
            files[0].0, files[1].0
        ))),
        _ => Ok(None),
    }
}

/// The `key = value` lines of `[section]` in an INI text, keys lowercased.
fn ini_section(text: &str, section: &str) -> Option<Vec<(String, String)>> {
    let mut found = None;
    let mut inside = false;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            inside = name.trim() == section;
            if inside && found.is_none() {
                found = Some(Vec::new());
            }
            continue;
        }
        if inside {
            if let (Some(keys), Some((k, v))) = (found.as_mut(), line.split_once('=')) {
                keys.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles_are_read_from_ini_sections() {
        let text = "# comment\n[default]\naws_access_key_id = A1\naws_secret_access_key=S1\n\n\
                    [profile dev]\nAWS_ACCESS_KEY_ID = A2\naws_secret_access_key = S2\n\
                    aws_session_token = T2\nregion = eu-west-1\n";
        let d = ini_section(text, "default").unwrap();
        assert_eq!(
            d,
            [
                ("aws_access_key_id".into(), "A1".into()),
                ("aws_secret_access_key".into(), "S1".into())
            ]
        );
        let dev = ini_section(text, "profile dev").unwrap();
        assert_eq!(dev.len(), 4);
        assert_eq!(dev[0], ("aws_access_key_id".into(), "A2".into()));
        assert!(ini_section(text, "dev").is_none());
    }

    #[test]
    fn sts_answers_are_read() {
        let xml = "<AssumeRoleWithWebIdentityResponse><AssumeRoleWithWebIdentityResult>\
                   <Credentials><SessionToken>T</SessionToken><SecretAccessKey>S</SecretAccessKey>\
                   <Expiration>2026-12-02T12:00:00Z</Expiration><AccessKeyId>ASIA1</AccessKeyId>\
                   </Credentials></AssumeRoleWithWebIdentityResult></AssumeRoleWithWebIdentityResponse>";
        assert_eq!(xml_text(xml, "AccessKeyId").as_deref(), Some("ASIA1"));
        assert_eq!(xml_text(xml, "Missing"), None);
        let t = expiry(&xml_text(xml, "Expiration").unwrap()).unwrap();
        assert_eq!(
            t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs(),
            1_796_212_800
        );
    }

    #[test]
    fn temporary_credentials_are_renewed_five_minutes_or_half_their_life_early() {
        let now = SystemTime::now();
        let hour = now + Duration::from_secs(3600);
        let at = refresh_at(hour);
        assert!(at <= hour - Duration::from_secs(299) && at >= hour - Duration::from_secs(301));
        let short = now + Duration::from_secs(20);
        let at = refresh_at(short);
        assert!(at >= now + Duration::from_secs(9) && at <= now + Duration::from_secs(11));
    }
}
