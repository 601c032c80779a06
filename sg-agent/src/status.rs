//! The status document and the metrics, shared by `api` and `cli`: what the running agent
//! writes into `SG_STATUS`, what `sg-agent status` assembles from the pins, and the
//! counters as rows and as Prometheus text.

#![forbid(unsafe_code)]

use std::{
    collections::BTreeMap,
    path::Path,
    time::{SystemTime, UNIX_EPOCH},
};

use sg_common::{counter, ct, drop_reason, Counters, DIR_EGRESS, DIR_INGRESS};

use sg_common::registry;

use crate::{
    compile::Plan,
    datapath::{DatapathError, IngressHook, Tables},
    source::LoadedState,
    sys,
};

/// An orphaned interface as status reports it.
#[derive(Clone, Debug)]
pub struct OrphanView {
    pub name: String,
    pub network_interface: String,
    pub groups: Vec<String>,
    pub since: SystemTime,
}

/// What the running agent reports about itself.
pub struct AgentView<'a> {
    pub state_path: &'a Path,
    pub run_dir: &'a Path,
    pub applied: Option<&'a LoadedState>,
    pub last_error: Option<&'a str>,
    pub hook: IngressHook,
    pub default_deny: bool,
    pub revalidate: bool,
    pub plan: &'a Plan,
    /// Interface names by ifindex.
    pub names: &'a BTreeMap<u32, String>,
    /// Orphaned interfaces by ifindex (SPEC §4).
    pub orphans: &'a BTreeMap<u32, OrphanView>,
    pub enforcement_lost: u64,
    pub last_lost: Option<SystemTime>,
    pub audit: bool,
    pub stats: &'a AgentStats,
    /// The state source: a file, or etcd with its connection and revisions.
    pub source: serde_json::Value,
}

/// What the running agent counts, for the metrics.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct AgentStats {
    pub applies: u64,
    pub apply_failures: u64,
    pub map_operations: u64,
    /// Unix seconds of the last successful apply.
    pub applied_unix: u64,
    pub enforcement_restored: u64,
    pub flow_log_records: u64,
    pub flow_log_skipped_packets: u64,
}

pub fn unix_now() -> u64 {
    unix(SystemTime::now())
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The agent's status document (JSON), written into `SG_STATUS` and served on `/status`.
pub fn agent_document(v: &AgentView<'_>) -> String {
    let interfaces: Vec<_> = v
        .plan
        .interfaces
        .iter()
        .map(|(ifindex, p)| {
            serde_json::json!({
                "ifindex": ifindex,
                "name": v.names.get(ifindex),
                "network_interface": p.eni,
                "groups": match v.orphans.get(ifindex) {
                    Some(o) => o.groups.clone(),
                    None => v.applied.and_then(|s| s.state.interface(&p.eni)).map(|n| n.groups.clone()).unwrap_or_default(),
                },
                "orphaned": v.orphans.contains_key(ifindex),
                "audit": p.config.flags & sg_common::IFACE_AUDIT != 0,
            })
        })
        .collect();
    let orphaned: Vec<_> = v
        .orphans
        .iter()
        .map(|(ifindex, o)| {
            serde_json::json!({
                "ifindex": ifindex,
                "name": o.name,
                "network_interface": o.network_interface,
                "orphaned_since_unix": unix(o.since),
                "orphaned_seconds": SystemTime::now().duration_since(o.since).map(|d| d.as_secs()).unwrap_or(0),
            })
        })
        .collect();
    serde_json::json!({
        "agent_pid": std::process::id(),
        "state_path": v.state_path,
        "run_dir": v.run_dir,
        "applied_state_sha256": v.applied.map(|s| s.sha256.clone()),
        "last_error": v.last_error,
        "ingress_hook": format!("{:?}", v.hook).to_lowercase(),
        "default_deny": v.default_deny,
        "revalidate": v.revalidate,
        "audit": v.audit,
        "stats": v.stats,
        "applied_revision": v.source["applied_revision"],
        "source": v.source,
        "interfaces": interfaces,
        "orphaned": orphaned,
        "enforcement_lost": {
            "count": v.enforcement_lost,
            "last_unix": v.last_lost.map(unix),
        },
        "rules": v.plan.rules.len(),
        "rulesets": v.plan.rulesets.len(),
        "prefixes": v.plan.prefixes.len(),
        "updated_unix": unix(SystemTime::now()),
    })
    .to_string()
}

/// (direction, counter name, value) for every counter slot with a name.
pub fn counter_rows(c: &Counters) -> Vec<(&'static str, String, u64)> {
    let mut rows = Vec::new();
    for (dir, dname) in [(DIR_INGRESS, "ingress"), (DIR_EGRESS, "egress")] {
        for (slot, name) in counter::NAMES.iter().enumerate() {
            rows.push((
                dname,
                name.to_string(),
                c.v[Counters::index(dir, slot as u32)],
            ));
        }
        for reason in 1..drop_reason::COUNT {
            let name = format!("dropped_{}", drop_reason::NAMES[reason as usize]);
            rows.push((
                dname,
                name,
                c.v[Counters::index(dir, counter::drop_slot(reason))],
            ));
        }
    }
    rows
}

/// The status of the agent whose pins are under `pin_dir`, whether it runs or not: its
/// own document and, per enforced interface, the counters and timeouts in the maps.
pub fn pinned_document(pin_dir: &Path) -> Result<serde_json::Value, DatapathError> {
    let tables = Tables::Pinned(pin_dir);
    let doc: serde_json::Value = tables
        .status_document()?
        .and_then(|d| serde_json::from_str(&d).ok())
        .unwrap_or(serde_json::Value::Null);
    let names: BTreeMap<u32, String> = sys::interfaces()
        .unwrap_or_default()
        .into_iter()
        .map(|h| (h.ifindex, h.name))
        .collect();
    let interfaces: Vec<serde_json::Value> = tables
        .interfaces()?
        .iter()
        .map(|(ifindex, (config, counters))| {
            let mut by_dir = serde_json::Map::new();
            for (dir, name, value) in counter_rows(counters) {
                by_dir
                    .entry(dir)
                    .or_insert_with(|| serde_json::json!({}))
                    .as_object_mut()
                    .expect("object")
                    .insert(name, value.into());
            }
            let agent_view = doc["interfaces"]
                .as_array()
                .and_then(|a| a.iter().find(|i| i["ifindex"] == *ifindex))
                .cloned()
                .unwrap_or(serde_json::Value::Null);
            let timeouts: serde_json::Map<String, serde_json::Value> = ct::TIMEOUT_NAMES
                .iter()
                .zip(config.timeouts.iter())
                .map(|(n, v)| (n.to_string(), (*v).into()))
                .collect();
            serde_json::json!({
                "ifindex": ifindex,
                "name": names.get(ifindex),
                "network_interface": agent_view["network_interface"],
                "groups": agent_view["groups"],
                "orphaned": agent_view["orphaned"].as_bool().unwrap_or(false),
                "audit": config.flags & sg_common::IFACE_AUDIT != 0,
                "counters": by_dir,
                "timeouts": timeouts,
            })
        })
        .collect();
    let agent_running = doc["agent_pid"]
        .as_u64()
        .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
    // One document, each field once: what the agent wrote, with the maps' view of each
    // interface (name, groups, counters, timeouts) merged into its entry.
    let mut out = match doc {
        serde_json::Value::Object(map) => map,
        _ => serde_json::Map::new(),
    };
    out.insert("schema_version".into(), SCHEMA_VERSION.into());
    out.insert("pin_dir".into(), serde_json::json!(pin_dir));
    out.insert("agent_running".into(), agent_running.into());
    out.insert("interfaces".into(), interfaces.into());
    let maps: Vec<serde_json::Value> = crate::datapath::pinned_memory(pin_dir)
        .into_iter()
        .map(|(name, entries, bytes)| {
            serde_json::json!({ "name": name, "entries": entries, "memory_bytes": bytes })
        })
        .collect();
    out.insert("maps".into(), maps.into());
    Ok(serde_json::Value::Object(out))
}

/// The version of `sg-agent status --json`'s document; bumped when a field changes
/// meaning or goes away.
pub const SCHEMA_VERSION: u32 = 2;

/// One metric family in the Prometheus text format: HELP, TYPE, then its samples.
struct Family {
    text: String,
}

impl Family {
    fn new(name: &str, kind: &str, help: &str) -> Family {
        Family {
            text: format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"),
        }
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.text += name;
        if !labels.is_empty() {
            let inner: Vec<String> = labels
                .iter()
                .map(|(k, v)| {
                    let v = v
                        .replace('\\', "\\\\")
                        .replace('"', "\\\"")
                        .replace('\n', "\\n");
                    format!("{k}=\"{v}\"")
                })
                .collect();
            self.text += &format!("{{{}}}", inner.join(","));
        }
        self.text += &format!(" {value}\n");
    }
}

/// The metrics of the agent whose pins are under `pin_dir` (SPEC §7), in the Prometheus
/// text format; `document` is the running agent's status document and `labels` what its
/// rule ids mean.
pub fn metrics(pin_dir: &Path, document: &str, labels: &crate::events::Labels) -> String {
    let doc: serde_json::Value = serde_json::from_str(document).unwrap_or_default();
    let tables = Tables::Pinned(pin_dir);
    let ifaces = tables.interfaces().unwrap_or_default();
    let names: BTreeMap<u32, String> = sys::interfaces()
        .unwrap_or_default()
        .into_iter()
        .map(|h| (h.ifindex, h.name))
        .collect();
    let eni_of = |ifindex: u32| -> String {
        doc["interfaces"]
            .as_array()
            .and_then(|a| a.iter().find(|i| i["ifindex"] == ifindex))
            .and_then(|i| i["network_interface"].as_str())
            .unwrap_or("")
            .to_string()
    };
    let mut packets = Family::new(
        "sg_packets_total",
        "counter",
        "Packets seen by the enforcing programs, by interface, direction and verdict (allowed_*, or dropped with a reason).",
    );
    let mut bytes = Family::new(
        "sg_bytes_total",
        "counter",
        "Frame bytes seen by the enforcing programs, by interface, direction and verdict.",
    );
    let mut dropped = Family::new(
        "sg_dropped_packets_total",
        "counter",
        "Packets dropped, by interface, direction and drop reason.",
    );
    let mut allowance = Family::new(
        "sg_conntrack_allowance_exceeded_total",
        "counter",
        "Packets dropped because the connection tracking table was full (the ENA metric conntrack_allowance_exceeded).",
    );
    let mut events_lost = Family::new(
        "sg_flow_events_skipped_total",
        "counter",
        "Flow events the kernel did not report (rate limit or full ring), by interface and direction.",
    );
    let mut audited = Family::new(
        "sg_audit_passed_packets_total",
        "counter",
        "Packets audit mode passed that policy would have dropped.",
    );
    for (ifindex, (_, c)) in &ifaces {
        let name = names.get(ifindex).cloned().unwrap_or_default();
        let eni = eni_of(*ifindex);
        for (dir, dname) in [(sg_common::DIR_INGRESS, "ingress"), (DIR_EGRESS, "egress")] {
            let labels = |verdict: &str| -> Vec<(&str, String)> {
                vec![
                    ("interface", name.clone()),
                    ("network_interface", eni.clone()),
                    ("direction", dname.to_string()),
                    ("verdict", verdict.to_string()),
                ]
            };
            let emit = |f: &mut Family, metric: &str, l: Vec<(&str, String)>, v: u64| {
                let l: Vec<(&str, &str)> = l.iter().map(|(k, v)| (*k, v.as_str())).collect();
                f.sample(metric, &l, v);
            };
            for (slot, cname) in counter::NAMES.iter().enumerate() {
                let slot = slot as u32;
                let at = Counters::index(dir, slot);
                match slot {
                    counter::EVENTS_LOST | counter::EVENTS_SUPPRESSED => {
                        let mut l = labels("");
                        l.pop();
                        l.push(("cause", (*cname).to_string()));
                        emit(&mut events_lost, "sg_flow_events_skipped_total", l, c.v[at]);
                    }
                    counter::AUDIT_PASSED => {
                        let mut l = labels("");
                        l.pop();
                        emit(&mut audited, "sg_audit_passed_packets_total", l, c.v[at]);
                    }
                    counter::RULE_HITS_LOST => {}
                    _ => {
                        emit(&mut packets, "sg_packets_total", labels(cname), c.v[at]);
                        emit(&mut bytes, "sg_bytes_total", labels(cname), c.bytes[at]);
                    }
                }
            }
            for reason in 1..drop_reason::COUNT {
                let at = Counters::index(dir, counter::drop_slot(reason));
                let rname = drop_reason::NAMES[reason as usize];
                let verdict = format!("dropped_{rname}");
                emit(&mut packets, "sg_packets_total", labels(&verdict), c.v[at]);
                emit(&mut bytes, "sg_bytes_total", labels(&verdict), c.bytes[at]);
                let mut l = labels("");
                l.pop();
                l.push(("reason", rname.to_string()));
                emit(&mut dropped, "sg_dropped_packets_total", l, c.v[at]);
                if reason == drop_reason::CONNTRACK_FULL {
                    let mut l = labels("");
                    l.pop();
                    emit(
                        &mut allowance,
                        "sg_conntrack_allowance_exceeded_total",
                        l,
                        c.v[at],
                    );
                }
            }
        }
    }
    let mut hits = Family::new(
        "sg_rule_hits_total",
        "counter",
        "Flows admitted, by security group and stable rule id.",
    );
    for (id, n) in tables.rule_hits().unwrap_or_default() {
        match labels.rules.get(&id) {
            Some((rule, group)) => hits.sample(
                "sg_rule_hits_total",
                &[("group_id", group), ("rule_id", rule)],
                n,
            ),
            None => hits.sample(
                "sg_rule_hits_total",
                &[("group_id", ""), ("rule_id", &format!("#{id}"))],
                n,
            ),
        }
    }
    let mut entries = Family::new(
        "sg_conntrack_entries",
        "gauge",
        "Tracked flows, by table (established: protected; new: embryonic and unassured, evictable).",
    );
    let mut capacity = Family::new(
        "sg_conntrack_capacity",
        "gauge",
        "Capacity of each connection tracking table, in entries.",
    );
    let flows = tables.flows().unwrap_or_default();
    let established = flows.iter().filter(|f| f.2).count();
    entries.sample(
        "sg_conntrack_entries",
        &[("table", "established")],
        established,
    );
    entries.sample(
        "sg_conntrack_entries",
        &[("table", "new")],
        flows.len() - established,
    );
    for (table, spec) in [("established", &registry::CT), ("new", &registry::CT_NEW)] {
        if let Ok(size) = crate::datapath::pinned_max_entries(pin_dir, spec) {
            capacity.sample("sg_conntrack_capacity", &[("table", table)], size);
        }
    }
    let mut memory = Family::new(
        "sg_map_memory_bytes",
        "gauge",
        "Kernel memory each pinned map holds (memlock), in bytes.",
    );
    for (name, _, bytes) in crate::datapath::pinned_memory(pin_dir) {
        memory.sample("sg_map_memory_bytes", &[("map", name)], bytes);
    }
    let stat = |k: &str| doc["stats"][k].as_u64().unwrap_or(0);
    let mut out = String::new();
    for f in [
        packets,
        bytes,
        dropped,
        allowance,
        audited,
        events_lost,
        hits,
        entries,
        capacity,
        memory,
    ] {
        out += &f.text;
    }
    let counter_family = |out: &mut String, name: &str, help: &str, value: u64| {
        let mut f = Family::new(name, "counter", help);
        f.sample(name, &[], value);
        *out += &f.text;
    };
    counter_family(
        &mut out,
        "sg_state_applies_total",
        "States (or membership changes) applied.",
        stat("applies"),
    );
    counter_family(
        &mut out,
        "sg_state_apply_failures_total",
        "States that could not be applied (the last valid one stayed enforced).",
        stat("apply_failures"),
    );
    counter_family(
        &mut out,
        "sg_map_operations_total",
        "BPF map operations made to apply states.",
        stat("map_operations"),
    );
    counter_family(
        &mut out,
        "sg_flow_log_records_total",
        "Flow log records written.",
        stat("flow_log_records"),
    );
    counter_family(
        &mut out,
        "sg_flow_log_skipped_packets_total",
        "Packets reported as SKIPDATA in the flow log.",
        stat("flow_log_skipped_packets"),
    );
    counter_family(
        &mut out,
        "sg_enforcement_lost_total",
        "Times something removed the agent's programs, links or pins.",
        doc["enforcement_lost"]["count"].as_u64().unwrap_or(0),
    );
    counter_family(
        &mut out,
        "sg_enforcement_restored_total",
        "Times the agent restored enforcement after a loss.",
        stat("enforcement_restored"),
    );
    let mut ts = Family::new(
        "sg_state_applied_timestamp_seconds",
        "gauge",
        "Unix time of the last successful apply.",
    );
    ts.sample(
        "sg_state_applied_timestamp_seconds",
        &[],
        stat("applied_unix"),
    );
    out += &ts.text;
    let mut rev = Family::new(
        "sg_state_applied_revision",
        "gauge",
        "Revision of the applied state at its source (etcd's revision; 0 for a file).",
    );
    rev.sample(
        "sg_state_applied_revision",
        &[],
        doc["applied_revision"].as_u64().unwrap_or(0),
    );
    out += &rev.text;
    let mut info = Family::new(
        "sg_build_info",
        "gauge",
        "Build of the running sg-agent: version, commit and the eBPF object's SHA-256.",
    );
    info.sample(
        "sg_build_info",
        &[
            ("version", env!("CARGO_PKG_VERSION")),
            ("commit", env!("SG_COMMIT")),
            ("ebpf_object_sha256", env!("SG_OBJECT_SHA256")),
        ],
        1,
    );
    out += &info.text;
    out
}
