//! The SQL of `sql/`, built into the binary: `pgtrickle-relay sql | psql URL`.

/// The install script: every file of `sql/` in order.
pub const INSTALL: &[(&str, &str)] = &[
    ("00_catalog.sql", include_str!("../sql/00_catalog.sql")),
    ("10_outbox.sql", include_str!("../sql/10_outbox.sql")),
    (
        "20_consumer_groups.sql",
        include_str!("../sql/20_consumer_groups.sql"),
    ),
    ("30_inbox.sql", include_str!("../sql/30_inbox.sql")),
    (
        "40_inbox_workers.sql",
        include_str!("../sql/40_inbox_workers.sql"),
    ),
    (
        "41_inbox_ordering.sql",
        include_str!("../sql/41_inbox_ordering.sql"),
    ),
    (
        "42_inbox_priority.sql",
        include_str!("../sql/42_inbox_priority.sql"),
    ),
    (
        "43_inbox_monitoring.sql",
        include_str!("../sql/43_inbox_monitoring.sql"),
    ),
    (
        "44_inbox_retention.sql",
        include_str!("../sql/44_inbox_retention.sql"),
    ),
    (
        "50_maintenance.sql",
        include_str!("../sql/50_maintenance.sql"),
    ),
];

/// The whole script as one text.
pub fn script() -> String {
    let mut s = String::from(
        "-- pgtrickle-relay: relay catalog and outbox/inbox kit (idempotent).\n\
         -- Install: pgtrickle-relay sql | psql -v ON_ERROR_STOP=1 \"$DATABASE_URL\"\n",
    );
    for (name, text) in INSTALL {
        s.push_str(&format!("\n-- ==== {name} ====\n"));
        s.push_str(text);
        if !text.ends_with('\n') {
            s.push('\n');
        }
    }
    s
}
