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
    Ok(serde_json::Value::Object(out))
}

/// The version of `sg-agent status --json`'s document; bumped when a field changes
/// meaning or goes away.
pub const SCHEMA_VERSION: u32 = 2;

/// Counters of every enforced interface in Prometheus text format.
pub fn metrics(pin_dir: &Path) -> String {
    let mut out = String::from("# TYPE sg_packets_total counter\n");
    if let Ok(ifaces) = Tables::Pinned(pin_dir).interfaces() {
        for (ifindex, (_, counters)) in ifaces {
            for (direction, name, value) in counter_rows(&counters) {
                out += &format!("sg_packets_total{{ifindex=\"{ifindex}\",direction=\"{direction}\",counter=\"{name}\"}} {value}\n");
            }
        }
    }
    out
}
