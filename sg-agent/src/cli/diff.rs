//! `sg-agent diff --state NEW`: what applying a new state would change — groups, rules,
//! members and interfaces, the map operations on this host — and which live flows it
//! would cut. Exit 0 when nothing would change, 2 when something would (as `terraform
//! plan -detailed-exitcode`), 1 when it cannot tell.

#![forbid(unsafe_code)]

use std::{path::Path, process::ExitCode};

use super::inspect::check_pins;
use crate::{
    agent,
    change::ChangeSummary,
    compile::{self, LocalInterface, Options},
    conntrack::opening_port,
    datapath::{addr_of, direction_of, Tables},
    model::State,
    source, status, sys,
};

/// Exit code when something would change.
const EXIT_CHANGES: u8 = 2;

/// The state the agent applied: the file it follows when its content is still the one
/// applied, else the definitions it saved for the interfaces it enforces.
fn applied_state(doc: &serde_json::Value, run_dir: &Path) -> (State, String) {
    if let (Some(path), Some(sha)) = (
        doc["state_path"].as_str(),
        doc["applied_state_sha256"].as_str(),
    ) {
        if let Ok(l) = source::load_file(Path::new(path)) {
            if l.sha256 == sha {
                return (l.state, format!("{path} (sha256 {})", &sha[..12]));
            }
        }
    }
    (
        agent::load_known(run_dir),
        format!(
            "{} (the definitions of the enforced interfaces; the applied file has changed since)",
            run_dir.join("enforced.json").display()
        ),
    )
}

pub(super) fn diff(new_path: &Path, pin_dir: &Path, json: bool) -> ExitCode {
    let new = match source::load_file(new_path) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("{e}");
            eprintln!(
                "sg-agent diff: {} is not valid; nothing would be applied",
                new_path.display()
            );
            return ExitCode::FAILURE;
        }
    };
    if let Err(code) = check_pins(pin_dir, "diff") {
        return code;
    }
    let doc = match status::pinned_document(pin_dir) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("sg-agent diff: {e}");
            return ExitCode::FAILURE;
        }
    };
    let run_dir = agent::run_dir_of(pin_dir);
    let (old, old_source) = applied_state(&doc, &run_dir);
    let summary = ChangeSummary::between(&old, &new.state);
    let old_plan = match agent::pinned_plan(pin_dir) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("sg-agent diff: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The interfaces the agent would enforce: those it enforces that the new state still
    // names (the others stay enforced as orphans, SPEC §4), and any the new state binds
    // here by MAC address.
    let host = sys::interfaces().unwrap_or_default();
    let mut locals: Vec<LocalInterface> = Vec::new();
    let mut orphaned = Vec::new();
    for (ifindex, p) in &old_plan.interfaces {
        if new.state.interface(&p.eni).is_some() {
            locals.push(LocalInterface {
                ifindex: *ifindex,
                eni: p.eni.clone(),
            });
        } else {
            orphaned.push(p.eni.clone());
        }
    }
    for (h, eni) in agent::bind(&new.state, &host, &[]) {
        if !locals.iter().any(|l| l.ifindex == h.ifindex) {
            locals.push(LocalInterface {
                ifindex: h.ifindex,
                eni,
            });
        }
    }
    let options = Options {
        default_deny: doc["default_deny"].as_bool().unwrap_or(false),
        audit: doc["audit"].as_bool().unwrap_or(false),
    };
    let mut new_plan = compile::compile(&new.state, &locals, &options, Some(&old_plan));
    // Orphans keep their programmed policy.
    let mut old_kept = old_plan.clone();
    for (ifindex, p) in &old_plan.interfaces {
        if orphaned.contains(&p.eni) {
            new_plan.interfaces.remove(ifindex);
            old_kept.interfaces.remove(ifindex);
            old_kept.prefixes.retain(|k, _| k.ifindex != *ifindex);
        }
    }
    let ops = compile::diff(&old_kept, &new_plan);
    // Flows: tracked ones outlive their rules (SPEC §1.10) unless the agent revalidates;
    // untracked traffic of a removed rule stops at once.
    let revalidate = doc["revalidate"].as_bool().unwrap_or(false);
    let flows = Tables::Pinned(pin_dir).flows().unwrap_or_default();
    let now = sys::boot_ns()
        + Tables::Pinned(pin_dir)
            .global()
            .map(|g| g.clock_offset_ns)
            .unwrap_or(0);
    let mut no_longer_allowed = Vec::new();
    for f in &flows {
        let (k, e, _) = f;
        let Some(iface) = new_plan.interfaces.get(&k.ifindex) else {
            continue;
        };
        if !crate::conntrack::is_live(k, e, &iface.config.timeouts, now) {
            continue;
        }
        let (proto, port) = opening_port(k, e.origin);
        let remote = addr_of(k.family, &k.remote);
        if !new_plan
            .lookup(k.ifindex, direction_of(e.origin), remote, proto, port)
            .allows()
        {
            no_longer_allowed.push(crate::conntrack::flow_json(f, now, &old_plan.rules));
        }
    }
    let untracked_rules_removed: Vec<_> = summary
        .rules_removed
        .iter()
        .filter(|r| {
            old_plan.rulesets.values().any(|rs| {
                rs.grants.iter().any(|g| {
                    g.flags != 0
                        && old_plan
                            .rules
                            .get(&g.rule_id)
                            .is_some_and(|i| i.stable_id == r.rule_id)
                })
            })
        })
        .cloned()
        .collect();
    let changes = !summary.is_empty() || !ops.is_empty();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "changes": changes,
                "from": old_source,
                "to": new_path,
                "summary": summary,
                "orphaned": orphaned,
                "map_operations": ops.len(),
                "revalidate": revalidate,
                "flows_cut": if revalidate { no_longer_allowed.clone() } else { vec![] },
                "flows_kept_no_longer_allowed": if revalidate { vec![] } else { no_longer_allowed.clone() },
                "untracked_rules_removed": untracked_rules_removed,
            }))
            .unwrap_or_default()
        );
    } else {
        println!("from {old_source}");
        println!("to   {} (sha256 {})", new_path.display(), &new.sha256[..12]);
        let list = |what: &str, items: Vec<String>| {
            for i in items {
                println!("  {what} {i}");
            }
        };
        list("+ group", summary.groups_added.clone());
        list("- group", summary.groups_removed.clone());
        let rule = |r: &crate::change::RuleChange| {
            format!("{} {} {}: {}", r.group_id, r.direction, r.rule_id, r.rule)
        };
        list("+ rule", summary.rules_added.iter().map(rule).collect());
        list("- rule", summary.rules_removed.iter().map(rule).collect());
        let member = |(g, n): &(String, String)| format!("{n} in {g}");
        list(
            "+ member",
            summary.members_added.iter().map(member).collect(),
        );
        list(
            "- member",
            summary.members_removed.iter().map(member).collect(),
        );
        list("+ interface", summary.interfaces_added.clone());
        list("- interface", summary.interfaces_removed.clone());
        list("~ interface", summary.interfaces_changed.clone());
        list("~ prefix list", summary.prefix_lists_changed.clone());
        list("! orphaned (keeps its last policy)", orphaned.clone());
        println!("{} map operations on this host", ops.len());
        let flow = |f: &serde_json::Value| {
            format!(
                "{} {} {} remote {} port {} (rule {})",
                f["ifindex"],
                f["protocol"].as_str().unwrap_or(""),
                f["local"].as_str().unwrap_or(""),
                f["remote"].as_str().unwrap_or(""),
                f["local_port"],
                f["rule_id"].as_str().unwrap_or("-")
            )
        };
        if revalidate {
            println!(
                "{} tracked flows would be cut (--revalidate)",
                no_longer_allowed.len()
            );
            list("x flow", no_longer_allowed.iter().map(flow).collect());
        } else {
            println!(
                "{} tracked flows are no longer allowed but stay (tracked flows outlive their rules; --revalidate cuts them)",
                no_longer_allowed.len()
            );
        }
        list(
            "x untracked traffic stops at once for rule",
            untracked_rules_removed.iter().map(rule).collect(),
        );
        println!("{}", if changes { "changes" } else { "no changes" });
    }
    if changes {
        ExitCode::from(EXIT_CHANGES)
    } else {
        ExitCode::SUCCESS
    }
}
