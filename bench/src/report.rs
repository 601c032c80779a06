//! Reporting: summaries of repeated measurements, and publishing each benchmark's section
//! of docs/benchmarks.md and its key of target/bench/results.json.

use std::{path::PathBuf, time::Instant};

use serde_json::{json, Value};

/// Summary of repeated measurements.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Stat {
    pub(crate) median: f64,
    pub(crate) min: f64,
    pub(crate) max: f64,
}

pub(crate) fn stat(mut v: Vec<f64>) -> Stat {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    Stat {
        median: v[v.len() / 2],
        min: v[0],
        max: v[v.len() - 1],
    }
}

pub(crate) fn stat_json(s: Stat, unit: &str) -> Value {
    json!({ "median": s.median, "min": s.min, "max": s.max, "unit": unit })
}

pub(crate) fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Replaces (or appends) the section `name` of docs/benchmarks.md, and the key `name` of
/// target/bench/results.json.
pub(crate) static SMOKE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

pub(crate) fn publish(name: &str, markdown: &str, results: Value) {
    // A smoke run only proves the harness works: its figures never replace real ones.
    let smoke = SMOKE.load(std::sync::atomic::Ordering::Relaxed);
    let md_path = if smoke {
        root().join("target/bench/benchmarks-smoke.md")
    } else {
        root().join("docs/benchmarks.md")
    };
    std::fs::create_dir_all(md_path.parent().unwrap()).unwrap();
    let mut md = std::fs::read_to_string(&md_path).unwrap_or_else(|_| {
        "# Benchmarks\n\nMeasured with `cargo xtask bench` on the project's development VM (2 cores, shared \
         and noisy: compare figures of one run with each other, not across runs). Each section \
         is rewritten by the benchmark that owns it.\n"
            .to_string()
    });
    let (open, close) = (
        format!("<!-- bench:{name} -->"),
        format!("<!-- /bench:{name} -->"),
    );
    let block = format!("{open}\n{markdown}\n{close}");
    md = match (md.find(&open), md.find(&close)) {
        (Some(a), Some(b)) => format!("{}{}{}", &md[..a], block, &md[b + close.len()..]),
        _ => format!("{md}\n{block}\n"),
    };
    std::fs::write(&md_path, md).expect("writing docs/benchmarks.md");
    let json_path = root().join(if smoke {
        "target/bench/results-smoke.json"
    } else {
        "target/bench/results.json"
    });
    std::fs::create_dir_all(json_path.parent().unwrap()).unwrap();
    let mut all: Value = std::fs::read_to_string(&json_path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(json!({}));
    all[name] = results;
    std::fs::write(&json_path, serde_json::to_string_pretty(&all).unwrap()).unwrap();
    println!("{markdown}");
}

pub(crate) fn time<T>(f: impl FnOnce() -> T) -> (T, f64) {
    let t = Instant::now();
    let v = f();
    (v, t.elapsed().as_secs_f64() * 1000.0)
}
