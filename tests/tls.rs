//! TLS to PostgreSQL with libpq's sslmode meaning, against a private server
//! with a self-signed certificate.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use support::*;

#[test]
fn sslmodes_require_verify_full_and_sslrootcert() {
    let mut cert = None;
    let pg = Pg::start_with_files(
        &[
            "ssl=on",
            "ssl_cert_file=server.crt",
            "ssl_key_file=server.key",
        ],
        |dir| {
            let data = dir.join("data");
            let ok = Command::new("openssl")
                .args([
                    "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                ])
                .args(["-subj", "/CN=localhost", "-addext"])
                .arg("subjectAltName=DNS:localhost,IP:127.0.0.1")
                .arg("-keyout")
                .arg(data.join("server.key"))
                .arg("-out")
                .arg(data.join("server.crt"))
                .output()
                .expect("openssl is needed: run scripts/install-deps.sh");
            assert!(ok.status.success(), "{ok:?}");
            std::fs::set_permissions(
                data.join("server.key"),
                std::fs::Permissions::from_mode(0o600),
            )
            .unwrap();
            cert = Some(data.join("server.crt"));
        },
    );
    // Only TLS connections over TCP are allowed.
    std::fs::write(
        pg.dir.join("data/pg_hba.conf"),
        "local all all trust\nhostssl all all 127.0.0.1/32 trust\n",
    )
    .unwrap();
    let mut admin = postgres::Client::connect(
        &format!(
            "host={} port={} user=postgres dbname=postgres",
            pg.dir.display(),
            pg.port
        ),
        postgres::NoTls,
    )
    .unwrap();
    admin.batch_execute("SELECT pg_reload_conf()").unwrap();
    let cert = cert.unwrap();
    let base = format!("postgres://postgres@127.0.0.1:{}/postgres", pg.port);
    let install = Command::new(relay_bin()).arg("sql").output().unwrap();
    admin
        .batch_execute(&String::from_utf8(install.stdout).unwrap())
        .unwrap();

    let run = |url: &str| relay(url).arg("--once").output().unwrap();
    // require (and the default, prefer): encrypted, certificate not checked.
    for url in [format!("{base}?sslmode=require"), base.clone()] {
        let out = run(&url);
        assert!(
            out.status.success(),
            "{url}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // verify-full: the self-signed certificate is not trusted...
    let out = run(&format!("{base}?sslmode=verify-full"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("certificate verify failed"), "{stderr}");
    // ...unless sslrootcert names it.
    let out = run(&format!(
        "{base}?sslmode=verify-full&sslrootcert={}",
        cert.display()
    ));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Without TLS the server refuses us: the connections above used it.
    let out = run(&format!("{base}?sslmode=disable"));
    assert_eq!(out.status.code(), Some(1));
}
