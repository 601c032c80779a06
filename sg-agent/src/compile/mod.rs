//! The rule compiler: (validated state, local interfaces) → plan, the exact contents of
//! every policy map. Pure: knows nothing of BPF.
//!
//! Shape (DESIGN "Fast path"):
//! - Address stage, per (interface, direction): every peer becomes prefixes (group
//!   references expand to members' private addresses, prefix lists to their CIDRs). The
//!   prefixes are *flattened*: each carries the union of the grants of every prefix that
//!   contains it, so the longest match alone answers (SPEC §1.6a). Identical unions share
//!   one ruleset. Host prefixes (/32, /128) go to the exact-match table, the rest to the
//!   LPM trie.
//! - Port stage, per ruleset: each grant's protocol and ports become LPM prefixes over
//!   {protocol, port}: all protocols = /32, one protocol = /40, port blocks /41–/56, ICMP
//!   type = /48, type and code = /56. Overlaps are flattened in the same way (flags).
//!
//! Ids of rules and rulesets are kept from the previous plan where the content is the
//! same, so a small change in the state is a small diff.
//!
//! Rooms: `plan` (what the maps must hold, and lookups in it), `address` (peers →
//! flattened prefixes), `ports` (protocols and ports → port-stage prefixes), `ids` (stable
//! rule, ruleset and counter ids), `diff` (ordered map operations between two plans),
//! `membership` (the incremental path for members joining or leaving groups).

#![forbid(unsafe_code)]

mod address;
mod diff;
mod ids;
pub use ids::stable_rule_ids;
mod membership;
mod plan;
mod ports;

pub use address::expand_peers;
pub use diff::{diff, MapOp};
pub use membership::{
    changed_addresses, changed_interfaces, interfaces_change, membership_change, ChangedAddress,
    MembershipChange, PlanIndex,
};
pub use plan::{
    InterfacePlan, Plan, PlanVerdict, PrefixKey, RuleGrant, RuleInfo, RuleKey, Ruleset,
};
pub use ports::{port_entries, port_prefixes, PortPrefix};

use address::{flatten, members_by_group, opposite_allows_all, untracked_flags};
use ids::{assign_counter_slots, assign_rule_ids, Interner};

use std::collections::{BTreeSet, HashMap};

use sg_common::IfaceConfig;

use crate::{
    model::{Direction, State},
    net::{Cidr, Family},
};

/// A local interface the agent enforces, bound to a network interface of the state.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct LocalInterface {
    pub ifindex: u32,
    pub eni: String,
}

#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Enforce interfaces with no groups (drop everything but infrastructure).
    pub default_deny: bool,
    /// Audit mode on every interface (`run --audit`, SPEC §7).
    pub audit: bool,
}

/// Compiles the state for the given local interfaces. `previous` keeps ids stable.
pub fn compile(
    state: &State,
    locals: &[LocalInterface],
    options: &Options,
    previous: Option<&Plan>,
) -> Plan {
    let empty = Plan::default();
    let previous = previous.unwrap_or(&empty);
    let mut plan = Plan {
        rules: assign_rule_ids(state, previous),
        ..Plan::default()
    };
    let rule_ids: HashMap<(&str, Direction, usize), u32> = plan
        .rules
        .iter()
        .map(|(id, info)| {
            (
                (info.key.group.as_str(), info.key.direction, info.index),
                *id,
            )
        })
        .collect();
    let members = members_by_group(state);
    let mut interner = Interner::new(previous);

    for local in locals {
        let Some(eni) = state.interface(&local.eni) else {
            continue;
        };
        if eni.groups.is_empty() && !options.default_deny {
            continue;
        }
        let groups: Vec<_> = eni.groups.iter().filter_map(|g| state.group(g)).collect();
        for direction in Direction::BOTH {
            let opposite_all = opposite_allows_all(state, &groups, direction.opposite());
            let mut by_family: [HashMap<Cidr, BTreeSet<RuleGrant>>; 2] = Default::default();
            for g in &groups {
                for (index, rule) in g.rules(direction).iter().enumerate() {
                    let rule_id = rule_ids[&(g.id.as_str(), direction, index)];
                    for cidr in expand_peers(state, &members, rule) {
                        let flags = untracked_flags(rule, &cidr, &opposite_all);
                        let fam = (cidr.family() == Family::V6) as usize;
                        by_family[fam]
                            .entry(cidr)
                            .or_default()
                            .insert(RuleGrant { rule_id, flags });
                    }
                }
            }
            for entries in by_family {
                for (cidr, grants) in flatten(entries) {
                    let id = interner.intern(grants, &plan.rules);
                    plan.prefixes.insert(
                        PrefixKey {
                            ifindex: local.ifindex,
                            direction,
                            cidr,
                        },
                        id,
                    );
                }
            }
        }
        plan.interfaces.insert(
            local.ifindex,
            InterfacePlan {
                eni: eni.id.clone(),
                config: IfaceConfig {
                    flags: if options.audit || eni.audit {
                        sg_common::IFACE_AUDIT
                    } else {
                        0
                    },
                    timeouts: state.timeouts_for(eni),
                    counter_slot: 0,
                },
            },
        );
    }
    plan.rulesets = interner.used;
    assign_counter_slots(&mut plan, previous);
    plan
}
