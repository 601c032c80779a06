//! Benchmarks that need real agents and namespaces: the control plane (`agent`) and the
//! comparison with peers (`peers`). Used by the sg-bench binary; never by tests.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use aya::maps::{HashMap, MapData};
use serde_json::{json, Value};
use sg_common::{Addr4Key, RulesetRef, DIR_INGRESS};

use sg_tests::{
    lab::{agent_bin, write_state, TempDir},
    netns::{run, Netns},
};

use crate::scale;

pub type Publish<'a> = dyn FnMut(&str, &str, Value) + 'a;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// An agent enforcing `eth0` of a namespace, with its pins on a bpffs mounted by us in our
/// own mount namespace, so that we can read its maps while it runs.
struct PinnedAgent {
    _ns: Netns,
    child: Child,
    pins: PathBuf,
    ifindex: u32,
    dir: TempDir,
}

impl PinnedAgent {
    fn start(state: &Path, dir: TempDir, extra: &[&str]) -> PinnedAgent {
        let ns = Netns::new("bench");
        ns.ip(&[
            "link",
            "add",
            "eth0",
            "address",
            scale::SERVER_MAC,
            "type",
            "veth",
            "peer",
            "name",
            "eth1",
        ]);
        ns.ip(&["link", "set", "eth0", "up"]);
        ns.ip(&["link", "set", "eth1", "up"]);
        let ifindex = ns.ifindex("eth0");
        let pins = dir.path("pins");
        std::fs::create_dir_all(&pins).unwrap();
        run(Command::new("mount").args(["-t", "bpf", "bpf"]).arg(&pins));
        let log = std::fs::File::create(dir.path("agent.log")).unwrap();
        let child = ns
            .cmd(agent_bin().to_str().unwrap())
            .args(["run", "--state"])
            .arg(state)
            .arg("--pin-dir")
            .arg(pins.join("sg"))
            .arg("--run-dir")
            .arg(dir.path("run"))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting sg-agent");
        PinnedAgent {
            _ns: ns,
            child,
            pins: pins.join("sg"),
            ifindex,
            dir,
        }
    }

    fn addr4(&self) -> Option<HashMap<MapData, Addr4Key, RulesetRef>> {
        let data = MapData::from_pin(self.pins.join(sg_common::MAP_ADDR4)).ok()?;
        HashMap::try_from(aya::maps::Map::HashMap(data)).ok()
    }

    fn key(&self, i: u32) -> Addr4Key {
        Addr4Key {
            ifindex: self.ifindex,
            direction: DIR_INGRESS,
            _pad: [0; 3],
            addr: scale::member_v4(i).octets(),
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path("agent.log")).unwrap_or_default()
    }

    /// Waits (up to 2 s) until the agent has logged `n` applied states: each apply ends
    /// with its log line, after the status is written. A change the agent coalesced with
    /// the next one never gets its own line, so the deadline ends the wait, not the run.
    fn wait_applies(&self, n: usize) {
        let start = Instant::now();
        while self.log().matches("applied state").count() < n
            && start.elapsed() < Duration::from_secs(2)
        {
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0)
    }

    /// The agent's own figure for its last apply ("applied state … in X ms").
    fn last_apply_ms(&self) -> Option<f64> {
        applied_ms(&self.log())
    }

    /// Polls the pinned map every 100 µs (a benchmark needs finer steps than wait_for's).
    fn wait_member(&self, i: u32, deadline: Duration) -> Duration {
        let start = Instant::now();
        let key = self.key(i);
        let mut map = None;
        loop {
            if map.is_none() {
                map = self.addr4();
            }
            if let Some(m) = &map {
                if m.get(&key, 0).is_ok() {
                    return start.elapsed();
                }
            }
            if start.elapsed() > deadline {
                panic!(
                    "the agent did not program member {i} within {deadline:?}:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_micros(100));
        }
    }
}

impl Drop for PinnedAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let mount = self.pins.parent().unwrap().to_path_buf();
        let _ = Command::new("umount").arg(&mount).status();
    }
}

/// Control plane: state file change → maps updated, p50/p99 over single-member changes in
/// a 10,000-member group (both formats); full apply time and RSS at 10k rules and 100k
/// members.
pub fn bench_agent(smoke: bool, quick: bool, publish: &mut Publish) {
    let (members, changes) = if smoke {
        (1000, 10)
    } else if quick {
        (10_000, 30)
    } else {
        (10_000, 100)
    };
    let mut md = String::from("## Agent (`cargo xtask bench agent`)\n\n");
    let mut results = json!({});
    for format in ["toml", "json"] {
        let latency = one_member_latency(format, members, changes);
        let samples = &latency.end_to_end;
        let (p50, p99) = (percentile(samples, 0.5), percentile(samples, 0.99));
        let (a50, a99) = (
            percentile(&latency.agent, 0.5),
            percentile(&latency.agent, 0.99),
        );
        md += &format!(
            "- {format}: new state file (one more member of a {members}-member group) renamed into place → the \
             member's address in the map: p50 **{p50:.1} ms**, p99 **{p99:.1} ms**, max {:.1} ms ({changes} changes, \
             {} applied as membership changes; the agent's own read-to-programmed time p50 {a50:.2} ms, p99 {a99:.2} ms).\n",
            samples[samples.len() - 1],
            latency.incremental
        );
        results[format!("one_member_change_{format}")] = json!({ "members": members, "changes": changes,
            "p50_ms": p50, "p99_ms": p99, "min_ms": samples[0], "max_ms": samples[samples.len() - 1],
            "agent_p50_ms": a50, "agent_p99_ms": a99, "incremental": latency.incremental });
    }
    // Full apply and memory at 10k rules and 100k members, in both formats.
    let (rules, members, churn) = if smoke {
        (1000, 10_000, 20)
    } else {
        (10_000, 100_000, 1000)
    };
    let text = scale::state_text(rules, members);
    for format in ["toml", "json"] {
        let dir = TempDir::new("bench-agent-big");
        let state_path = dir.path(&format!("state.{format}"));
        let body = in_format(format, &text);
        write_state(&state_path, &body);
        let started = Instant::now();
        let agent = PinnedAgent::start(&state_path, dir, &[]);
        agent.wait_member(members - 1, Duration::from_secs(300));
        let start_to_enforced = started.elapsed().as_secs_f64() * 1000.0;
        agent.wait_applies(1);
        let rss = agent.rss_kib() as f64 / 1024.0;
        let apply_ms = agent.last_apply_ms().unwrap_or(f64::NAN);
        // Then membership changes, one member joining and leaving in turn: the agent's
        // memory must not grow with the changes it has applied.
        let joined = in_format(
            format,
            &format!("{text}{}", scale::members_text(members, members + 1)),
        );
        for k in 0..churn {
            let next = if k % 2 == 0 { &joined } else { &body };
            write_state(&state_path, next);
            agent.wait_applies(k as usize + 2);
        }
        if churn % 2 == 1 {
            agent.wait_member(members, Duration::from_secs(10));
        }
        let rss_after = agent.rss_kib() as f64 / 1024.0;
        let incremental = agent.log().matches("(membership").count();
        md += &format!(
            "- {format}, {rules} rules and {members} members ({:.1} MB file): agent start to enforced \
             {start_to_enforced:.0} ms (parse, compile and program {apply_ms:.0} ms as the agent logs it); \
             agent RSS after applying: **{rss:.1} MiB**; after {churn} membership changes (one member joining and \
             leaving in turn, {incremental} applied as membership changes): **{rss_after:.1} MiB** ({:+.1} %).\n",
            body.len() as f64 / 1e6,
            (rss_after / rss - 1.0) * 100.0
        );
        results[format!("large_{format}")] = json!({ "rules": rules, "members": members, "file_bytes": body.len(),
            "start_to_enforced_ms": start_to_enforced, "apply_ms": apply_ms, "rss_mib": rss,
            "churn": churn, "churn_incremental": incremental, "rss_after_churn_mib": rss_after });
    }
    md += "\nGoals: one-member change p99 ≤ 10 ms; RSS ≤ 64 MiB at 10k rules and 100k members, \
           start to enforced ≤ 1 s, RSS flat (≤ 5 % growth) over 1000 membership changes.\n";
    publish("agent", &md, results);
}

/// A native state `text` in `format` ("toml" as it is, "json" as AWS JSON).
fn in_format(format: &str, text: &str) -> String {
    if format == "toml" {
        text.to_string()
    } else {
        sg_agent::source::to_aws_json(&sg_agent::source::parse_str(text).expect("bench state"))
    }
}

/// One-member changes as the agent sees them.
pub struct Latency {
    /// The new state file in place (renamed over the old one) → the member's address in
    /// the map, sorted (ms).
    pub end_to_end: Vec<f64>,
    /// The agent's own figure for each change (read → maps programmed), sorted (ms).
    pub agent: Vec<f64>,
    /// Changes applied as membership changes (no full parse and compile).
    pub incremental: usize,
}

/// Rewrites the state file (one more member of a `members`-member group) `changes`
/// times and measures how soon the member's address is in the agent's map.
pub fn one_member_latency(format: &str, members: u32, changes: u32) -> Latency {
    let dir = TempDir::new("bench-agent");
    let state_path = dir.path(&format!("state.{format}"));
    let base_members = scale::state_text(100, members);
    let to_format = |text: &str| in_format(format, text);
    write_state(&state_path, &to_format(&base_members));
    let agent = PinnedAgent::start(&state_path, dir, &[]);
    agent.wait_member(members - 1, Duration::from_secs(60));
    // Let the agent finish starting (attach, status) before the first change.
    agent.wait_applies(1);
    let mut end_to_end = vec![];
    let mut text = base_members;
    for k in 0..changes {
        let i = members + k;
        text += &scale::members_text(i, i + 1);
        let body = to_format(&text);
        // The change is the moment the new file replaces the old one. The writer's own
        // time to write it is not the agent's: it writes and syncs a new file first, as
        // careful writers do (else ext4 flushes it inside the rename).
        let tmp = state_path.with_extension("next");
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp).expect("writing state");
            f.write_all(body.as_bytes()).expect("writing state");
            f.sync_all().expect("syncing state");
        }
        let start = Instant::now();
        std::fs::rename(&tmp, &state_path).expect("renaming state");
        let _ = agent.wait_member(i, Duration::from_secs(10));
        end_to_end.push(start.elapsed().as_secs_f64() * 1000.0);
        // The agent finishes its bookkeeping (hash, status) before the next change.
        agent.wait_applies(k as usize + 2);
    }
    let log = agent.log();
    let applies: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("applied state"))
        .collect();
    let changed = &applies[applies.len().saturating_sub(changes as usize)..];
    let mut agent_ms: Vec<f64> = changed.iter().filter_map(|l| applied_ms(l)).collect();
    let sort = |v: &mut Vec<f64>| v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    sort(&mut end_to_end);
    sort(&mut agent_ms);
    Latency {
        end_to_end,
        agent: agent_ms,
        incremental: changed.iter().filter(|l| l.contains("(membership")).count(),
    }
}

/// The duration of the last "applied state … in <duration>" line of an agent log, in ms.
pub fn applied_ms(log: &str) -> Option<f64> {
    let line = log.lines().rev().find(|l| l.contains("applied state"))?;
    let t = line.split(" in ").nth(1)?.split_whitespace().next()?;
    let t = t.trim_end_matches(':');
    let (num, unit) = t.split_at(t.find(|c: char| c.is_alphabetic() || c == 'µ')?);
    let v: f64 = num.parse().ok()?;
    Some(match unit {
        "s" => v * 1000.0,
        "ms" => v,
        "µs" => v / 1000.0,
        "ns" => v / 1e6,
        _ => return None,
    })
}

pub fn percentile_of(sorted: &[f64], p: f64) -> f64 {
    percentile(sorted, p)
}
