//! HTTP clients (the http sink, SQS and the AWS credential endpoints): one
//! ureq agent setup.

use std::time::Duration;

/// A ureq agent as the relay uses one: native TLS with the platform's
/// roots, every status answered (the caller classifies it), no redirects
/// followed, the relay's user agent, and `timeout` for a whole request.
pub fn agent(timeout: Option<Duration>) -> ureq::Agent {
    let tls = ureq::tls::TlsConfig::builder()
        .provider(ureq::tls::TlsProvider::NativeTls)
        .root_certs(ureq::tls::RootCerts::PlatformVerifier)
        .build();
    ureq::Agent::config_builder()
        .timeout_global(timeout)
        .http_status_as_error(false)
        .max_redirects(0)
        .tls_config(tls)
        .user_agent(concat!("pgtrickle-relay/", env!("CARGO_PKG_VERSION")))
        .build()
        .into()
}
