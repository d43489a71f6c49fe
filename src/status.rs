//! `pgtrickle-relay status`: every pipeline with its direction, owner,
//! committed position, pending events, lag and dead letters, read from
//! PostgreSQL only (so it works while the daemon runs elsewhere).

use postgres::Client;
use serde_json::{json, Value};

use crate::error::Error;
use crate::outbox::{quote_ident, OutboxInfo, Position, EVENTS_OF_ROW};
use crate::pipeline::{lock_key, Direction};

/// The owner of a pipeline: the `application_name` of the session holding
/// its advisory lock (`pgtrickle-relay <host>:<pid>`).
fn owner(client: &mut Client, relay_group: &str, name: &str) -> Result<Option<String>, Error> {
    let key = lock_key(relay_group, name);
    Ok(client
        .query_opt(
            "SELECT coalesce(a.application_name, 'pid ' || l.pid) FROM pg_locks l \
             LEFT JOIN pg_stat_activity a ON a.pid = l.pid \
             WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 \
               AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
               AND ((l.classid::bigint << 32) | l.objid::bigint) = hashtextextended($1, 0)",
            &[&key],
        )?
        .map(|r| r.get(0)))
}

/// Events after `pos` (up to 1,000,000 rows counted) and the age of the
/// oldest one.
fn pending(client: &mut Client, info: &OutboxInfo, pos: &Position) -> Result<(i64, f64), Error> {
    let t = quote_ident(&info.table);
    let filter = if info.has_txid {
        "(txid, id) > ($1::text::xid8, $2::bigint)"
    } else {
        "id > $2::bigint AND ($1::text IS NULL OR true)"
    };
    let row = client.query_one(
        &format!(
            "SELECT coalesce(sum({EVENTS_OF_ROW}), 0)::bigint, \
                    coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8 \
             FROM (SELECT * FROM pgtrickle.{t} WHERE {filter} LIMIT 1000000) s"
        ),
        &[&pos.txid_or_zero(), &pos.id],
    )?;
    Ok((row.get(0), row.get(1)))
}

/// Collect the status of every pipeline.
pub fn collect(client: &mut Client, relay_group: &str) -> Result<Value, Error> {
    let rows = client.query(
        "SELECT name, direction, enabled, config::text FROM pgtrickle.list_relay_configs()",
        &[],
    )?;
    let mut out = Vec::new();
    for r in rows {
        let name: String = r.get(0);
        let direction: String = r.get(1);
        let config: Value = serde_json::from_str(&r.get::<_, String>(3)).unwrap_or(Value::Null);
        let dead: i64 = client
            .query_one(
                "SELECT count(*) FROM pgtrickle.relay_dead_letters WHERE pipeline = $1",
                &[&name],
            )?
            .get(0);
        let mut p = json!({
            "name": name,
            "direction": direction,
            "enabled": r.get::<_, bool>(2),
            "owner": owner(client, relay_group, &name)?,
            "dead_letters": dead,
        });
        if Direction::parse(&direction) == Some(Direction::Forward) {
            let outbox = config["source"]["outbox"]
                .as_str()
                .unwrap_or("")
                .to_string();
            let group = config["source"]["group"].as_str().unwrap_or("").to_string();
            let is_group = !group.is_empty()
                && client
                    .query_opt(
                        "SELECT 1 FROM pgtrickle.pgt_consumer_groups WHERE group_name = $1",
                        &[&group],
                    )?
                    .is_some();
            p["outbox"] = outbox.clone().into();
            if is_group {
                p["consumer_group"] = group.into();
                p["owner"] = "(consumer group: every instance)".into();
            } else {
                let pos = Position::load(client, relay_group, &name)?;
                p["position"] = json!({"txid": pos.txid, "id": pos.id});
                match OutboxInfo::resolve(client, &outbox) {
                    Ok(info) => {
                        let (events, lag) = pending(client, &info, &pos)?;
                        p["pending_events"] = events.into();
                        p["lag_seconds"] = ((lag * 10.0).round() / 10.0).into();
                    }
                    Err(e) => p["error"] = crate::redact::secrets(&e.msg).into(),
                }
            }
        } else {
            p["inbox"] = config["sink"]["inbox"].clone();
        }
        out.push(p);
    }
    Ok(json!({ "relay_group": relay_group, "pipelines": out }))
}

/// Render the status as an aligned table.
pub fn table(status: &Value) -> String {
    let header = [
        "NAME",
        "DIRECTION",
        "ENABLED",
        "OWNER",
        "POSITION",
        "PENDING",
        "LAG_S",
        "DEAD",
    ];
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|s| s.to_string()).collect()];
    let text = |v: &Value| match v {
        Value::Null => "-".to_string(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    for p in status["pipelines"].as_array().into_iter().flatten() {
        let position = match (&p["position"], &p["consumer_group"]) {
            (Value::Object(o), _) => match &o["txid"] {
                Value::String(tx) => format!("{}@{tx}", o["id"]),
                _ => o["id"].to_string(),
            },
            (_, Value::String(g)) => format!("group {g}"),
            _ => "-".into(),
        };
        rows.push(vec![
            text(&p["name"]),
            text(&p["direction"]),
            text(&p["enabled"]),
            text(&p["owner"]),
            position,
            text(&p["pending_events"]),
            text(&p["lag_seconds"]),
            text(&p["dead_letters"]),
        ]);
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    let mut s = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        s.push_str(line.join("  ").trim_end());
        s.push('\n');
    }
    s
}
