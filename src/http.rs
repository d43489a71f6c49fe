//! The HTTP endpoints for operators, on `--metrics-addr`: `GET /metrics`
//! (Prometheus text) and `GET /health` (JSON; 200 healthy, 503 degraded).

use std::time::Duration;

use crate::{health, metrics};

/// Serve `/metrics` and `/health` on `addr` from a thread of its own;
/// returns the bound address (`addr` may use port 0).
pub fn serve(addr: &str, stall: Duration) -> Result<std::net::SocketAddr, String> {
    let server = tiny_http::Server::http(addr).map_err(|e| format!("listening on {addr}: {e}"))?;
    let bound = server
        .server_addr()
        .to_ip()
        .ok_or_else(|| format!("listening on {addr}: not an IP address"))?;
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
                    _ => (
                        404,
                        "text/plain",
                        b"not found: try /metrics or /health\n".to_vec(),
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
        .map_err(|e| format!("starting the http thread: {e}"))?;
    Ok(bound)
}
