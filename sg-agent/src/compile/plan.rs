//! The plan: the exact contents of every policy map, and the verdict it gives a packet
//! (looked up in user space the way the datapath does).

#![forbid(unsafe_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use sg_common::{Grant, IfaceConfig, PORT_KEY_FULL_BITS, PORT_KEY_RULESET_BITS};

use super::MapOp;
use crate::{
    model::{Direction, PortMatch, Protocol},
    net::{Cidr, Family},
};

use super::PortPrefix;

/// Identity of a rule across state changes: its group, direction, match and occurrence.
#[derive(
    Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct RuleKey {
    pub group: String,
    pub direction: Direction,
    pub protocol: Protocol,
    pub ports: PortMatch,
    pub nth: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RuleInfo {
    pub key: RuleKey,
    /// The stable id every output uses (SPEC §7): the input's `SecurityGroupRuleId`, or
    /// one derived from the rule's content.
    #[serde(default)]
    pub stable_id: String,
    pub group_name: String,
    /// Index of the rule in its group's list for its direction.
    pub index: usize,
    pub description: Option<String>,
}

/// One rule admitting traffic from/to one prefix; `flags` are `GRANT_UNTRACKED_*`.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct RuleGrant {
    pub rule_id: u32,
    pub flags: u32,
}

/// A set of grants shared by every prefix whose union it is, and its port-stage entries.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ruleset {
    pub grants: BTreeSet<RuleGrant>,
    pub ports: BTreeMap<PortPrefix, Grant>,
}

/// Key of the address stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PrefixKey {
    pub ifindex: u32,
    pub direction: Direction,
    pub cidr: Cidr,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InterfacePlan {
    pub eni: String,
    pub config: IfaceConfig,
}

/// The exact contents of every policy map.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub interfaces: BTreeMap<u32, InterfacePlan>,
    pub rules: BTreeMap<u32, RuleInfo>,
    pub rulesets: BTreeMap<u32, Ruleset>,
    pub prefixes: BTreeMap<PrefixKey, u32>,
}

/// What the datapath decides for a packet with no tracked flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlanVerdict {
    /// The interface is not enforced.
    NotEnforced,
    Deny,
    Allow(Grant),
}

impl PlanVerdict {
    pub fn allows(&self) -> bool {
        !matches!(self, PlanVerdict::Deny)
    }
}

impl Plan {
    /// Mirrors the kernel's policy lookup exactly: interface present, then the longest
    /// prefix of the remote address, then the longest port-stage prefix.
    pub fn lookup(
        &self,
        ifindex: u32,
        direction: Direction,
        remote: IpAddr,
        protocol: u8,
        port: u16,
    ) -> PlanVerdict {
        if !self.interfaces.contains_key(&ifindex) {
            return PlanVerdict::NotEnforced;
        }
        let bits = Family::of(&remote).bits();
        let ruleset = (0..=bits).rev().find_map(|len| {
            self.prefixes.get(&PrefixKey {
                ifindex,
                direction,
                cidr: Cidr::truncate(remote, len),
            })
        });
        let Some(ruleset) = ruleset.and_then(|id| self.rulesets.get(id)) else {
            return PlanVerdict::Deny;
        };
        let full = PortPrefix {
            protocol,
            port,
            len: PORT_KEY_FULL_BITS,
        };
        (PORT_KEY_RULESET_BITS..=PORT_KEY_FULL_BITS)
            .rev()
            .find_map(|len| ruleset.ports.get(&full.parent(len)))
            .map_or(PlanVerdict::Deny, |g| PlanVerdict::Allow(*g))
    }

    /// Number of map entries the plan programs (address stage, port stage, interfaces).
    pub fn entry_count(&self) -> usize {
        self.prefixes.len()
            + self.rulesets.values().map(|r| r.ports.len()).sum::<usize>()
            + self.interfaces.len()
    }

    /// Applies one map operation to this plan as to the kernel's maps.
    pub fn apply(&mut self, op: &MapOp) {
        match op {
            MapOp::PutInterface { ifindex, plan, .. } => {
                self.interfaces.insert(*ifindex, (**plan).clone());
            }
            MapOp::DeleteInterface { ifindex } => {
                self.interfaces.remove(ifindex);
            }
            MapOp::PutPort {
                ruleset,
                prefix,
                grant,
            } => {
                self.rulesets
                    .entry(*ruleset)
                    .or_default()
                    .ports
                    .insert(*prefix, *grant);
            }
            MapOp::DeletePort { ruleset, prefix } => {
                if let Some(r) = self.rulesets.get_mut(ruleset) {
                    r.ports.remove(prefix);
                    if r.ports.is_empty() {
                        self.rulesets.remove(ruleset);
                    }
                }
            }
            MapOp::PutPrefix { key, ruleset } => {
                self.prefixes.insert(*key, *ruleset);
            }
            MapOp::DeletePrefix { key } => {
                self.prefixes.remove(key);
            }
        }
    }
}
