//! Helpers for the SQL tests (tests/sql_*.rs): fresh databases with
//! sql/install.sql, expected errors, one-value queries, consumer-group
//! calls, notifications, the SQL files piped through psql.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use postgres::fallible_iterator::FallibleIterator;
use postgres::types::ToSql;
use postgres::Client;
use serde_json::{json, Value};

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

/// The type names the kit's functions use that a session may shadow with a
/// temporary type of the same name (names PostgreSQL parses as keywords,
/// like `bigint` or `boolean`, always mean pg_catalog's).
const SHADOWED_TYPES: &[&str] = &[
    "text",
    "jsonb",
    "json",
    "xid8",
    "uuid",
    "timestamptz",
    "int2",
    "int4",
    "int8",
    "bool",
    "name",
    "oid",
    "regclass",
    "regtype",
    "regnamespace",
    "float8",
    "\"char\"",
];

/// The catalogs the kit's functions read, shadowed by temporary tables.
const SHADOWED_CATALOGS: &[&str] = &[
    "pg_class",
    "pg_constraint",
    "pg_index",
    "pg_type",
    "pg_namespace",
    "pg_trigger",
    "pg_roles",
];

/// SQL planting issue 9's traps in the session's temporary schema: a
/// function that, when it runs as any role but the session's, counts itself
/// in the temporary sequence `pwned` and makes the session's role a
/// superuser; domains named like the types the kit uses whose CHECK calls
/// it; a temporary `pg_attribute` that points every text column of every
/// user table at such a domain (`pg_temp.evil`); and empty tables named
/// like the other catalogs the kit reads.
fn traps_sql() -> String {
    let mut sql = String::from(
        "CREATE TEMP SEQUENCE pwned;
         CREATE FUNCTION pg_temp.trap() RETURNS boolean LANGUAGE plpgsql AS $$
         BEGIN
             IF current_user <> session_user THEN
                 PERFORM pg_catalog.nextval('pg_temp.pwned');
                 EXECUTE pg_catalog.format('ALTER ROLE %I SUPERUSER', session_user);
             END IF;
             RETURN true;
         END $$;
         CREATE DOMAIN pg_temp.evil AS pg_catalog.text CHECK (pg_temp.trap());
         CREATE TEMP TABLE pg_attribute AS
         SELECT a.attrelid, a.attname, a.attnum, a.attisdropped, a.atttypmod,
                CASE WHEN a.atttypid = 'pg_catalog.text'::pg_catalog.regtype
                     THEN 'pg_temp.evil'::pg_catalog.regtype::pg_catalog.oid
                     ELSE a.atttypid END AS atttypid
           FROM pg_catalog.pg_attribute a
           JOIN pg_catalog.pg_class c ON c.oid = a.attrelid
           JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
          WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
            AND n.nspname NOT LIKE 'pg\\_%';\n",
    );
    for t in SHADOWED_TYPES {
        sql += &format!("CREATE DOMAIN pg_temp.{t} AS pg_catalog.{t} CHECK (pg_temp.trap());\n");
    }
    for t in SHADOWED_CATALOGS {
        sql += &format!("CREATE TEMP TABLE {t} AS SELECT * FROM pg_catalog.{t} WHERE false;\n");
    }
    sql
}

/// Run `sql` as the non-superuser login role `role` of database `db`, in a
/// fresh session with every trap of [`traps_sql`] planted. None when the
/// statement succeeded and nothing ran as another role; else what went
/// wrong (the role is made a non-superuser again through `admin`).
pub fn attack(pg: &Pg, admin: &mut Client, db: &str, role: &str, sql: &str) -> Option<String> {
    let mut c = pg.client(&pg.url_as(db, role, "unused"));
    c.batch_execute(&traps_sql())
        .unwrap_or_else(|e| panic!("planting the traps as {role}: {e}"));
    let result = c.batch_execute(sql);
    let ran_as_owner = bool_of(&mut c, "SELECT is_called FROM pg_temp.pwned");
    let superuser = bool_of(
        admin,
        &format!("SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = '{role}'"),
    );
    if superuser {
        admin
            .batch_execute(&format!("ALTER ROLE {role} NOSUPERUSER"))
            .unwrap();
    }
    match (ran_as_owner || superuser, result) {
        (true, _) => Some(format!(
            "{sql}: the trap ran as the function's owner (superuser afterwards: {superuser})"
        )),
        (false, Err(e)) => Some(format!(
            "{sql}: failed under the traps: {}",
            e.as_db_error()
                .map_or(e.to_string(), |d| d.message().to_string())
        )),
        (false, Ok(())) => None,
    }
}

/// `poll_outbox(group, consumer, n)`: the outbox ids leased.
pub fn poll(c: &mut Client, group: &str, consumer: &str, n: i32) -> Vec<i64> {
    ids(
        c,
        "SELECT outbox_id FROM pgtrickle.poll_outbox($1, $2, $3)",
        &[&group, &consumer, &n],
    )
}

/// `commit_offset(group, consumer, last)`: whether the commit was taken.
pub fn commit(c: &mut Client, group: &str, consumer: &str, last: i64) -> bool {
    c.query_one(
        "SELECT pgtrickle.commit_offset($1, $2, $3)",
        &[&group, &consumer, &last],
    )
    .unwrap()
    .get(0)
}

/// The group's committed watermark.
pub fn watermark(c: &mut Client, group: &str) -> i64 {
    c.query_one(
        "SELECT committed_id FROM pgtrickle.pgt_consumer_groups WHERE group_name = $1",
        &[&group],
    )
    .unwrap()
    .get(0)
}

/// `n` one-row events `{"n": i}` published into `outbox`; their ids.
pub fn publish(c: &mut Client, outbox: &str, n: usize) -> Vec<i64> {
    (0..n)
        .map(|i| {
            let payload = json!({ "n": i }).to_string();
            c.query_one(
                "SELECT pgtrickle.outbox_publish($1, $2::text::jsonb)",
                &[&outbox, &payload],
            )
            .unwrap()
            .get(0)
        })
        .collect()
}

/// Wait until every row of `pgtrickle.<table>` is below the commit horizon
/// (other tests' transactions on this server may hold it back briefly).
pub fn wait_horizon(c: &mut Client, table: &str) {
    let sql = format!(
        "SELECT coalesce((SELECT max(txid) FROM pgtrickle.{table}) < pg_snapshot_xmin(pg_current_snapshot()), true)"
    );
    super::wait_until(30, "the commit horizon", || bool_of(c, &sql));
}

/// Notifications on `c`: wait for `want` of them, then make sure no more come.
pub fn notifications(c: &mut Client, want: usize) -> Vec<(String, String)> {
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while got.len() < want && Instant::now() < deadline {
        let mut notes = c.notifications();
        let next = notes
            .timeout_iter(Duration::from_millis(100))
            .next()
            .unwrap();
        if let Some(n) = next {
            got.push((n.channel().to_string(), n.payload().to_string()));
        }
    }
    let mut notes = c.notifications();
    let extra = notes
        .timeout_iter(Duration::from_millis(200))
        .next()
        .unwrap();
    if let Some(n) = extra {
        panic!(
            "unexpected extra notification {} {} after {got:?}",
            n.channel(),
            n.payload()
        );
    }
    assert_eq!(got.len(), want, "notifications: {got:?}");
    got
}

/// A config notification's JSON payload.
pub fn config_note(payload: &str) -> Value {
    serde_json::from_str(payload).unwrap()
}

/// The project's sql/ directory.
pub fn sql_dir() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/sql"))
}

/// 00..30 concatenated, as `pgtrickle-relay sql` prints them.
pub fn concatenated_sql() -> String {
    [
        "00_catalog.sql",
        "10_outbox.sql",
        "20_consumer_groups.sql",
        "30_inbox.sql",
    ]
    .iter()
    .map(|f| std::fs::read_to_string(sql_dir().join(f)).unwrap())
    .collect::<Vec<_>>()
    .join("\n")
}

/// Pipe SQL text into psql, like `pgtrickle-relay sql | psql`.
pub fn psql_stdin(url: &str, sql: &str) -> (bool, String) {
    let mut child = Command::new(super::pg_bindir().join("psql"))
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", url])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(sql.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
