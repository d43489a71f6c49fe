//! Helpers for the SQL tests (tests/sql.rs, tests/sql_inbox.rs): fresh
//! databases with sql/install.sql, expected errors, one-value queries.

use postgres::types::ToSql;
use postgres::Client;
use serde_json::Value;

use super::Pg;

/// A fresh database `name` with sql/install.sql installed (through psql);
/// its server, URL and a client. (Not `Pg::new_db`: it sends DROP and
/// CREATE DATABASE in one query string, which PostgreSQL runs as one
/// transaction and refuses.)
pub fn setup(name: &str) -> (&'static Pg, String, Client) {
    let pg = Pg::shared();
    let mut admin = pg.client(&pg.url("postgres"));
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
        .unwrap();
    admin
        .batch_execute(&format!("CREATE DATABASE \"{name}\""))
        .unwrap();
    let url = pg.url(name);
    pg.install_sql(&url);
    let client = pg.client(&url);
    (pg, url, client)
}

/// The SQLSTATE and message of the error `sql` must raise.
pub fn db_err(c: &mut Client, sql: &str) -> (String, String) {
    let e = c
        .batch_execute(sql)
        .expect_err(&format!("expected an error from: {sql}"));
    let db = e
        .as_db_error()
        .unwrap_or_else(|| panic!("not a database error from {sql}: {e}"));
    (db.code().code().to_string(), db.message().to_string())
}

/// `sql` fails with SQLSTATE `code` and a message containing `message_part`.
pub fn assert_err(c: &mut Client, sql: &str, code: &str, message_part: &str) {
    let (got_code, got_msg) = db_err(c, sql);
    assert_eq!(got_code, code, "SQLSTATE of {sql} (message: {got_msg})");
    assert!(
        got_msg.contains(message_part),
        "message of {sql}: {got_msg:?} lacks {message_part:?}"
    );
}

/// The one bigint `sql` returns.
pub fn i64_of(c: &mut Client, sql: &str) -> i64 {
    c.query_one(sql, &[]).unwrap().get(0)
}

/// The one boolean `sql` returns.
pub fn bool_of(c: &mut Client, sql: &str) -> bool {
    c.query_one(sql, &[]).unwrap().get(0)
}

/// The one (nullable) text `sql` returns.
pub fn text_of(c: &mut Client, sql: &str) -> Option<String> {
    c.query_one(sql, &[]).unwrap().get(0)
}

/// A json/jsonb expression's value (the postgres crate has no serde_json
/// feature here).
pub fn json_of(c: &mut Client, sql_expr: &str) -> Value {
    let t: Option<String> = c
        .query_one(&format!("SELECT ({sql_expr})::text"), &[])
        .unwrap()
        .get(0);
    serde_json::from_str(&t.expect("NULL json")).unwrap()
}

/// The bigint first column of every row of `sql`.
pub fn ids(c: &mut Client, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Vec<i64> {
    c.query(sql, params)
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// A login role that is only a member of pgtrickle_relay, and a connection as it.
pub fn relay_login(pg: &Pg, admin: &mut Client, db: &str, role: &str) -> Client {
    admin
        .batch_execute(&format!(
            "DO $$ BEGIN
                 IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{role}') THEN
                     CREATE ROLE {role} LOGIN IN ROLE pgtrickle_relay;
                 END IF;
             END $$;"
        ))
        .unwrap();
    pg.client(&pg.url_as(db, role, "unused"))
}
