//! The HTTP endpoints for operators, on `--metrics-addr`: `GET /metrics`
//! (Prometheus text), `GET /health` (JSON; 200 healthy, 503 degraded),
//! `GET /livez` (200 while the process serves) and `GET /readyz` (JSON;
//! 200 ready, 503 not: see [`health::ready`]).

use std::time::Duration;

use crate::error::Error;
use crate::{health, metrics};

/// Serve the endpoints on `addr` from a thread of its own;
/// returns the bound address (`addr` may use port 0).
pub fn serve(addr: &str, stall: Duration) -> Result<std::net::SocketAddr, Error> {
    let server = tiny_http::Server::http(addr)
        .map_err(|e| Error::permanent(format!("listening on {addr}: {e}")))?;
    let bound = server
        .server_addr()
        .to_ip()
        .ok_or_else(|| Error::permanent(format!("listening on {addr}: not an IP address")))?;
    std::thread::Builder::new()
        .name("http".into())
        .spawn(move || {
            for req in server.incoming_requests() {
                let path = req.url().split('?').next().unwrap_or("").to_string();
                let is_get = *req.method() == tiny_http::Method::Get;
                let (code, ctype, body) = match (is_get, path.as_str()) {
                    (true, "/metrics") => (
                        200,
                        "text/plain; version=0.0.4; charset=utf-8",
                        metrics::get().encode(),
                    ),
                    (true, "/health") => {
                        let (ok, report) = health::report(stall);
                        (
                            if ok { 200 } else { 503 },
                            "application/json",
                            format!("{report}\n").into_bytes(),
                        )
                    }
                    (true, "/livez") => (200, "text/plain", b"ok\n".to_vec()),
                    (true, "/readyz") => {
                        let (ok, report) = health::ready();
                        (
                            if ok { 200 } else { 503 },
                            "application/json",
                            format!("{report}\n").into_bytes(),
                        )
                    }
                    _ => (
                        404,
                        "text/plain",
                        b"not found: try /metrics, /health, /livez or /readyz\n".to_vec(),
                    ),
                };
                let header = tiny_http::Header::from_bytes(&b"Content-Type"[..], ctype.as_bytes())
                    .expect("valid header");
                let _ = req.respond(
                    tiny_http::Response::from_data(body)
                        .with_status_code(code)
                        .with_header(header),
                );
            }
        })
        .map_err(|e| Error::from(e).context("starting the http thread"))?;
    Ok(bound)
}

/// `pgtrickle-relay probe`: GET `path` from the relay serving on `addr`
/// (an unspecified address means this host); Ok when it answers 200.
pub fn probe(addr: &str, path: &str) -> Result<(), Error> {
    use std::io::{Read, Write};
    use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
    let mut target: SocketAddr = addr
        .to_socket_addrs()
        .map_err(|e| Error::from(e).context(format!("--metrics-addr {addr}")))?
        .next()
        .ok_or_else(|| Error::permanent(format!("--metrics-addr {addr}: no address")))?;
    if target.ip().is_unspecified() {
        target.set_ip(if target.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    let timeout = Duration::from_secs(3);
    let mut s = TcpStream::connect_timeout(&target, timeout)
        .map_err(|e| Error::from(e).context(format!("connecting to {target}")))?;
    s.set_read_timeout(Some(timeout))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {target}\r\n\r\n")
        .map_err(|e| Error::from(e).context(format!("asking {target}{path}")))?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)
        .map_err(|e| Error::from(e).context(format!("reading {target}{path}")))?;
    let status = answer.lines().next().unwrap_or("");
    match status.split_whitespace().nth(1) {
        Some("200") => Ok(()),
        _ => Err(Error::transient(format!(
            "{target}{path} answered {status:?}"
        ))),
    }
}
