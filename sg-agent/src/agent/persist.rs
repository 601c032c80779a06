//! What the agent keeps beside the pins: rule metadata that the maps cannot tell (saved
//! after every change, so a restarted agent keeps ids stable and applies only the
//! difference), adoption of what is pinned, and the run directory.

#![forbid(unsafe_code)]

use std::{
    collections::BTreeMap,
    io::Write,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use super::{io, AgentError};
use crate::{
    compile::{port_entries, Plan, RuleGrant, RuleInfo},
    datapath::{Datapath, Tables},
};

/// The default run directory for a pin directory in this network namespace, so agents of
/// two namespaces (whose /sys/fs/bpf differ) never share one.
pub fn default_run_dir(pin_dir: &Path) -> PathBuf {
    let flat: String = pin_dir
        .to_string_lossy()
        .trim_matches('/')
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let netns = std::fs::read_link("/proc/self/ns/net")
        .ok()
        .and_then(|l| {
            l.to_str().map(|s| {
                s.trim_start_matches("net:[")
                    .trim_end_matches(']')
                    .to_string()
            })
        })
        .unwrap_or_default();
    PathBuf::from("/run/sg").join(format!("{flat}-{netns}"))
}

#[derive(Serialize, Deserialize, Default)]
struct Metadata {
    rules: Vec<(u32, RuleInfo)>,
    grants: Vec<(u32, Vec<RuleGrant>)>,
    interfaces: Vec<(u32, String)>,
}

/// The previous plan: what the maps hold, with the saved metadata when it matches them.
pub(super) fn adopt(dp: &mut Datapath, run_dir: &Path) -> Result<Plan, AgentError> {
    read_plan(&dp.tables(), run_dir)
}

/// The run directory of the agent whose pins are under `pin_dir`: the one its status
/// document names, else the default.
pub fn run_dir_of(pin_dir: &Path) -> PathBuf {
    Tables::Pinned(pin_dir)
        .status_document()
        .ok()
        .flatten()
        .and_then(|d| serde_json::from_str::<serde_json::Value>(&d).ok())
        .and_then(|d| d["run_dir"].as_str().map(PathBuf::from))
        .unwrap_or_else(|| default_run_dir(pin_dir))
}

/// The plan programmed under `pin_dir`, read back from the kernel's maps, with the rule
/// metadata (stable ids, groups) the agent saved beside them when it matches the maps.
pub fn pinned_plan(pin_dir: &Path) -> Result<Plan, AgentError> {
    read_plan(&Tables::Pinned(pin_dir), &run_dir_of(pin_dir))
}

fn read_plan(tables: &Tables<'_>, run_dir: &Path) -> Result<Plan, AgentError> {
    let mut plan = tables.read_back()?;
    let path = run_dir.join("plan.json");
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(plan);
    };
    let Ok(meta) = serde_json::from_str::<Metadata>(&text) else {
        log::warn!(
            "{}: unreadable; rebuilding ids from the maps",
            path.display()
        );
        return Ok(plan);
    };
    let rules: BTreeMap<u32, RuleInfo> = meta.rules.into_iter().collect();
    let consistent = meta.grants.iter().all(|(id, grants)| {
        let grants = grants.iter().copied().collect();
        plan.rulesets
            .get(id)
            .is_some_and(|r| r.ports == port_entries(&grants, &rules))
    }) && meta.grants.len() == plan.rulesets.len();
    if !consistent {
        log::warn!(
            "{}: does not match the pinned maps; rebuilding ids from the maps",
            path.display()
        );
        return Ok(plan);
    }
    for (id, grants) in meta.grants {
        if let Some(r) = plan.rulesets.get_mut(&id) {
            r.grants = grants.into_iter().collect();
        }
    }
    for (ifindex, eni) in meta.interfaces {
        if let Some(i) = plan.interfaces.get_mut(&ifindex) {
            i.eni = eni;
        }
    }
    plan.rules = rules;
    Ok(plan)
}

pub(super) fn save_metadata(run_dir: &Path, plan: &Plan) -> Result<(), AgentError> {
    let meta = Metadata {
        rules: plan.rules.iter().map(|(id, r)| (*id, r.clone())).collect(),
        grants: plan
            .rulesets
            .iter()
            .map(|(id, r)| (*id, r.grants.iter().copied().collect()))
            .collect(),
        interfaces: plan
            .interfaces
            .iter()
            .map(|(i, p)| (*i, p.eni.clone()))
            .collect(),
    };
    let path = run_dir.join("plan.json");
    let tmp = run_dir.join("plan.json.tmp");
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(
            serde_json::to_string(&meta)
                .map_err(std::io::Error::other)?
                .as_bytes(),
        )?;
        std::fs::rename(&tmp, &path)
    };
    write().map_err(io(format!("saving {}", path.display())))
}

/// The lock that makes one agent the owner of a pin directory (SPEC §6), held for the
/// agent's life; the file names the holder's pid.
pub struct OwnerLock {
    _file: std::fs::File,
}

fn lock_path(run_dir: &Path) -> PathBuf {
    run_dir.join("agent.lock")
}

/// Takes the lock, or says which agent holds it.
pub fn lock(run_dir: &Path, pin_dir: &Path) -> Result<OwnerLock, AgentError> {
    let path = lock_path(run_dir);
    match crate::sys::lock_exclusive(&path) {
        Ok(mut file) => {
            use std::io::Seek;
            let pid = std::process::id().to_string();
            file.set_len(0)
                .and_then(|()| file.rewind())
                .and_then(|()| file.write_all(pid.as_bytes()))
                .map_err(io(format!("writing {}", path.display())))?;
            Ok(OwnerLock { _file: file })
        }
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Err(AgentError::Owned {
            pin_dir: pin_dir.to_path_buf(),
            pid: holder_pid(run_dir),
        }),
        Err(e) => Err(io(format!("locking {}", path.display()))(e)),
    }
}

/// The pid of the agent that holds the pins of `run_dir`, if one runs.
pub fn holder(run_dir: &Path) -> Option<u32> {
    let path = lock_path(run_dir);
    if !path.exists() {
        return None;
    }
    match crate::sys::lock_exclusive(&path) {
        // Free: nobody holds it (the lock goes with the file when we return).
        Ok(_) => None,
        Err(_) => holder_pid(run_dir).or(Some(0)),
    }
}

fn holder_pid(run_dir: &Path) -> Option<u32> {
    std::fs::read_to_string(lock_path(run_dir))
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn known_path(run_dir: &Path) -> PathBuf {
    run_dir.join("enforced.json")
}

/// The last valid definitions of the locally enforced interfaces (and the groups and
/// prefix lists they use), saved by the previous run; empty when there are none.
pub fn load_known(run_dir: &Path) -> crate::model::State {
    let path = known_path(run_dir);
    let Ok(text) = std::fs::read_to_string(&path) else {
        return crate::model::State::default();
    };
    match crate::source::parse_str(&text) {
        Ok(state) => state,
        Err(problems) => {
            log::warn!(
                "{}: unreadable ({} problems); orphaned interfaces cannot be kept from it",
                path.display(),
                problems.len()
            );
            crate::model::State::default()
        }
    }
}

/// Saves what `load_known` reads (AWS JSON, replaced atomically).
pub(super) fn save_known(run_dir: &Path, known: &crate::model::State) -> Result<(), AgentError> {
    let path = known_path(run_dir);
    let tmp = run_dir.join("enforced.json.tmp");
    std::fs::write(&tmp, crate::source::to_aws_json(known))
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(io(format!("saving {}", path.display())))
}
