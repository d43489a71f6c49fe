//! What every benchmark shares: the number of runs, scenario selection,
//! medians, peak RSS, and the JSON line of one figure.
//!
//! Every figure is one JSON object on stdout:
//! `{"name", "value", "unit", "limit", "limit_of", "ratio", "runs", ...}`
//! plus the figure's parameters; `limit`, `limit_of` and `ratio`
//! (value / limit) only where a limit was measured beside it. Progress
//! goes to stderr.
#![allow(dead_code)]

use std::process::Child;
use std::time::Duration;

use serde_json::{json, Map, Value};

/// Runs per figure: `BENCH_RUNS` (default 3); the median is reported.
pub fn runs() -> usize {
    env_or("BENCH_RUNS", 3)
}

/// The value of environment variable `name`, parsed, or `default`.
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

/// Whether `BENCH_ONLY` (a comma-separated list of substrings) selects
/// scenario `name`; all run when it is unset.
pub fn selected(name: &str) -> bool {
    match std::env::var("BENCH_ONLY") {
        Ok(only) if !only.is_empty() => only
            .split(',')
            .any(|p| !p.trim().is_empty() && name.contains(p.trim())),
        _ => true,
    }
}

/// Whether this binary was run by `cargo bench` (`cargo test --benches`
/// runs it without `--bench`: then it does nothing).
pub fn benching() -> bool {
    std::env::args().any(|a| a == "--bench")
}

/// The median of `v` (the upper one of an even count).
pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// `x` rounded to `digits` decimals.
pub fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

/// A limit measured beside a figure: its value and what it is.
#[derive(Clone, Debug)]
pub struct Limit {
    /// In the figure's unit.
    pub value: f64,
    /// What was measured, e.g. `pg_read` or `min(pg_read,nats_publish)`.
    pub of: String,
}

impl Limit {
    /// A limit named `of`.
    pub fn new(value: f64, of: &str) -> Limit {
        Limit {
            value,
            of: of.to_string(),
        }
    }

    /// The smaller of two limits (the one that binds).
    pub fn min(a: &Limit, b: &Limit) -> Limit {
        Limit {
            value: a.value.min(b.value),
            of: format!("min({},{})", a.of, b.of),
        }
    }
}

/// Print one figure as a JSON line: `value` in `unit`, its `limit` and
/// ratio if any, and `params` (an object) merged in.
pub fn emit(name: &str, value: f64, unit: &str, limit: Option<&Limit>, params: Value) {
    let digits = if value.abs() >= 100.0 { 0 } else { 2 };
    let mut o = Map::new();
    o.insert("name".into(), json!(name));
    o.insert("value".into(), json!(round(value, digits)));
    o.insert("unit".into(), json!(unit));
    if let Some(l) = limit {
        o.insert("limit".into(), json!(round(l.value, digits)));
        o.insert("limit_of".into(), json!(l.of));
        o.insert("ratio".into(), json!(round(value / l.value, 3)));
    }
    if let Value::Object(p) = params {
        for (k, v) in p {
            o.entry(k).or_insert(v);
        }
    }
    println!("{}", Value::Object(o));
}

/// Wait for `child` to exit, sampling its peak RSS (VmHWM, from /proc:
/// rusage would include this process's own high-water mark); returns the
/// exit status and the peak in MB.
pub fn wait_peak_rss(child: &mut Child) -> (std::process::ExitStatus, f64) {
    let status_file = format!("/proc/{}/status", child.id());
    let mut peak_kb = 0f64;
    loop {
        if let Some(kb) = std::fs::read_to_string(&status_file).ok().and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        }) {
            peak_kb = peak_kb.max(kb);
        }
        if let Some(status) = child.try_wait().unwrap() {
            return (status, peak_kb / 1024.0);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}
