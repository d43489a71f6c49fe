//! Secrets out of text the relay shows: connection strings, URLs and error
//! messages on their way to the log, `/health` and `status`.
//!
//! Masked: the password of a URL's userinfo (`user:***@`), and the value
//! of every parameter whose name looks secret (`password`, `token`, `key`,
//! `secret`, `signature`, `sig`, `auth`, `access_token`, `api_key`, …),
//! whether it is a URL query parameter (`?token=…&…`) or a libpq-style
//! `name=value` word (`password=…`). Names are compared without case, and
//! `-` counts as `_`.

/// Exact parameter names that hold secrets.
const SECRET_NAMES: &[&str] = &[
    "pass",
    "pwd",
    "key",
    "access_key",
    "accesskey",
    "secret_key",
    "private_key",
    "client_key",
    "sig",
    "auth",
    "authorization",
    "session",
    "sessionid",
    "session_id",
];

/// Parts of a parameter name that make it secret wherever they appear.
const SECRET_PARTS: &[&str] = &[
    "password",
    "passwd",
    "token",
    "secret",
    "signature",
    "credential",
    "apikey",
    "api_key",
];

/// What stands in for a secret.
const MASK: &str = "***";

/// Whether a parameter named `name` holds a secret.
pub fn is_secret_name(name: &str) -> bool {
    let n = name.to_ascii_lowercase().replace('-', "_");
    SECRET_NAMES.contains(&n.as_str()) || SECRET_PARTS.iter().any(|p| n.contains(p))
}

/// `text` with every secret masked: URL passwords and the values of
/// secret-looking parameters.
pub fn secrets(text: &str) -> String {
    mask_params(&mask_userinfo(text))
}

/// Characters that end a URL or a parameter value inside a message.
fn ends_value(c: char) -> bool {
    c.is_whitespace() || matches!(c, '"' | '\'' | '`' | '<' | '>')
}

/// `scheme://user:password@host` → `scheme://user:***@host`, for every URL
/// in `text`.
fn mask_userinfo(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        let authority_end = tail
            .find(|c: char| ends_value(c) || matches!(c, '/' | '?' | '#'))
            .unwrap_or(tail.len());
        let authority = &tail[..authority_end];
        match authority.rfind('@') {
            Some(at) => {
                let userinfo = &authority[..at];
                match userinfo.find(':') {
                    Some(colon) => {
                        out.push_str(&userinfo[..colon + 1]);
                        out.push_str(MASK);
                    }
                    None => out.push_str(userinfo),
                }
                out.push_str(&authority[at..]);
            }
            None => out.push_str(authority),
        }
        rest = &tail[authority_end..];
    }
    out.push_str(rest);
    out
}

/// Mask the value of every `name=value` whose name is secret, where the
/// name starts the text or follows a URL separator (`?`, `&`, `;`) or a
/// delimiter of words (space, quote, bracket, comma).
fn mask_params(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(eq) = rest.find('=') {
        let before = &rest[..eq];
        let name_start = before
            .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.'))
            .map(|i| i + before[i..].chars().next().map_or(1, char::len_utf8))
            .unwrap_or(0);
        let name = &before[name_start..];
        let boundary_ok = match before[..name_start].chars().next_back() {
            None => true,
            Some(c) => {
                c.is_whitespace()
                    || matches!(c, '?' | '&' | ';' | '"' | '\'' | '(' | '[' | '{' | ',')
            }
        };
        out.push_str(&rest[..eq + 1]);
        let after = &rest[eq + 1..];
        if !name.is_empty() && boundary_ok && is_secret_name(name) {
            let value_end = value_end(after);
            if value_end > 0 {
                out.push_str(MASK);
            }
            rest = &after[value_end..];
        } else {
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// Where the value at the start of `s` ends: at `&`, `#` or a delimiter;
/// a libpq value in single quotes ends at its closing quote.
fn value_end(s: &str) -> usize {
    if let Some(quoted) = s.strip_prefix('\'') {
        let mut escaped = false;
        for (i, c) in quoted.char_indices() {
            match c {
                '\\' if !escaped => escaped = true,
                '\'' if !escaped => return i + 2,
                _ => escaped = false,
            }
        }
        return s.len();
    }
    s.find(|c: char| ends_value(c) || matches!(c, '&' | '#'))
        .unwrap_or(s.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_url_passwords() {
        assert_eq!(
            secrets("postgres://relay:s3cr3t@db:5432/app"),
            "postgres://relay:***@db:5432/app"
        );
        assert_eq!(
            secrets("postgres://relay@db/app"),
            "postgres://relay@db/app"
        );
        assert_eq!(
            secrets("redis://:pw@r:6379/0 and amqp://u:p%40ss@h/vh"),
            "redis://:***@r:6379/0 and amqp://u:***@h/vh"
        );
        // An @ after the authority (a path or query) is not userinfo.
        assert_eq!(secrets("http://h/a@b?to=x@y"), "http://h/a@b?to=x@y");
    }

    #[test]
    fn masks_secret_query_parameters() {
        assert_eq!(
            secrets("postgres://u@db/app?password=s3cr3t&sslmode=require"),
            "postgres://u@db/app?password=***&sslmode=require"
        );
        assert_eq!(
            secrets("error sending to http://h:1/hook?a=1&token=abc123#frag: refused"),
            "error sending to http://h:1/hook?a=1&token=***#frag: refused"
        );
        for name in [
            "access_token",
            "api_key",
            "apiKey",
            "X-Amz-Signature",
            "X-Amz-Credential",
            "X-Amz-Security-Token",
            "sig",
            "key",
            "auth",
            "client_secret",
        ] {
            let shown = secrets(&format!("https://h/p?{name}=SECRETVALUE&x=1"));
            assert!(!shown.contains("SECRETVALUE"), "{name}: {shown}");
            assert!(shown.contains("&x=1"), "{name}: {shown}");
        }
    }

    #[test]
    fn masks_libpq_words_and_keeps_the_rest() {
        assert_eq!(
            secrets("host=db user=relay password=s3cr3t dbname=app"),
            "host=db user=relay password=*** dbname=app"
        );
        assert_eq!(
            secrets("host=db password='a b\\' c' dbname=app"),
            "host=db password=*** dbname=app"
        );
        // Names that merely end like a secret are kept: dedup and routing
        // keys are what operators look for in logs.
        let plain = "dedup_key=orders:1:0 routing_key=a.b monkey=1 keepalives=1";
        assert_eq!(secrets(plain), plain);
        // `=` inside a value or a word is not a parameter.
        assert_eq!(secrets("a==b x=1"), "a==b x=1");
    }
}
