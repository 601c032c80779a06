//! Stable ids: rules, rulesets and counter slots keep the previous plan's ids where the
//! content is the same, so a small change in the state is a small diff.

#![forbid(unsafe_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::{port_entries, Ruleset};
use sha2::{Digest, Sha256};

use crate::model::{Direction, PortMatch, Protocol, Rule, State};

use super::{Plan, RuleGrant, RuleInfo, RuleKey};

/// Interfaces keep their counter slot across plans; new ones get the smallest free slot.
pub(super) fn assign_counter_slots(plan: &mut Plan, previous: &Plan) {
    let mut used = BTreeSet::new();
    for (ifindex, p) in plan.interfaces.iter_mut() {
        if let Some(old) = previous.interfaces.get(ifindex) {
            p.config.counter_slot = old.config.counter_slot;
            used.insert(old.config.counter_slot);
        }
    }
    let mut next = 0;
    for (ifindex, p) in plan.interfaces.iter_mut() {
        if previous.interfaces.contains_key(ifindex) {
            continue;
        }
        while used.contains(&next) {
            next += 1;
        }
        p.config.counter_slot = next;
        used.insert(next);
    }
}

/// The stable ids of a group's rules in one direction (SPEC §7): a rule's own
/// `SecurityGroupRuleId`, or `sgr-` and 17 hex digits (the shape of AWS's ids) of a hash
/// over what the rule is — group, direction, protocol, ports and peers in a canonical
/// order — and its occurrence among identical rules. Its position in the list and its
/// description do not count, so reordering or rewording rules, or any edit elsewhere,
/// leaves the id as it was.
pub fn stable_rule_ids(group: &str, direction: Direction, rules: &[Rule]) -> Vec<String> {
    let mut identical: HashMap<String, u32> = HashMap::new();
    rules
        .iter()
        .map(|rule| {
            if let Some(id) = &rule.id {
                return id.clone();
            }
            let mut peers: Vec<String> = rule.peers.iter().map(|p| p.to_string()).collect();
            peers.sort();
            peers.dedup();
            let content = format!(
                "{group}\n{direction}\n{}\n{}\n{}",
                rule.protocol,
                rule.ports,
                peers.join(",")
            );
            let n = identical.entry(content.clone()).or_default();
            *n += 1;
            let digest = Sha256::digest(format!("{content}\n{}", *n - 1).as_bytes());
            let hex: String = digest.iter().take(9).map(|b| format!("{b:02x}")).collect();
            format!("sgr-{}", &hex[..17])
        })
        .collect()
}

pub(super) fn assign_rule_ids(state: &State, previous: &Plan) -> BTreeMap<u32, RuleInfo> {
    let known: HashMap<&RuleKey, u32> =
        previous.rules.iter().map(|(id, r)| (&r.key, *id)).collect();
    let mut keys = Vec::new();
    for g in &state.security_groups {
        for direction in Direction::BOTH {
            let mut seen: HashMap<(Protocol, PortMatch), u32> = HashMap::new();
            let ids = stable_rule_ids(&g.id, direction, g.rules(direction));
            for ((index, rule), stable_id) in g.rules(direction).iter().enumerate().zip(ids) {
                let nth = seen.entry((rule.protocol, rule.ports)).or_default();
                let key = RuleKey {
                    group: g.id.clone(),
                    direction,
                    protocol: rule.protocol,
                    ports: rule.ports,
                    nth: *nth,
                };
                *nth += 1;
                keys.push((
                    key,
                    RuleInfo {
                        key: RuleKey {
                            group: String::new(),
                            direction,
                            protocol: rule.protocol,
                            ports: rule.ports,
                            nth: 0,
                        },
                        stable_id,
                        group_name: g.name.clone(),
                        index,
                        description: rule.description.clone(),
                    },
                ));
            }
        }
    }
    let mut rules = BTreeMap::new();
    let mut fresh = IdAllocator::new(previous.rules.keys().copied());
    // Known rules keep their ids; new ones get ids never used by the previous plan.
    let mut pending = Vec::new();
    for (key, mut info) in keys {
        info.key = key;
        match known.get(&info.key) {
            Some(id) => {
                rules.insert(*id, info);
            }
            None => pending.push(info),
        }
    }
    for info in pending {
        rules.insert(fresh.next(), info);
    }
    rules
}

/// Hands out ids ≥ 1 that are not in `taken`.
pub(super) struct IdAllocator {
    taken: BTreeSet<u32>,
    next: u32,
}

impl IdAllocator {
    fn new(taken: impl Iterator<Item = u32>) -> Self {
        IdAllocator {
            taken: taken.collect(),
            next: 1,
        }
    }

    fn next(&mut self) -> u32 {
        while self.taken.contains(&self.next) {
            self.next += 1;
        }
        self.taken.insert(self.next);
        self.next
    }
}

/// Shares identical rulesets, reusing the previous plan's id for the same content.
pub(super) struct Interner {
    previous: HashMap<BTreeSet<RuleGrant>, u32>,
    ids: HashMap<BTreeSet<RuleGrant>, u32>,
    pub(super) used: BTreeMap<u32, Ruleset>,
    fresh: IdAllocator,
}

impl Interner {
    pub(super) fn new(previous: &Plan) -> Self {
        Interner {
            // Rulesets read back from maps without metadata have no grants: never reused.
            previous: previous
                .rulesets
                .iter()
                .filter(|(_, r)| !r.grants.is_empty())
                .map(|(id, r)| (r.grants.clone(), *id))
                .collect(),
            ids: HashMap::new(),
            used: BTreeMap::new(),
            fresh: IdAllocator::new(previous.rulesets.keys().copied()),
        }
    }

    pub(super) fn intern(
        &mut self,
        grants: BTreeSet<RuleGrant>,
        rules: &BTreeMap<u32, RuleInfo>,
    ) -> u32 {
        if let Some(id) = self.ids.get(&grants) {
            return *id;
        }
        let id = match self.previous.get(&grants) {
            Some(id) => *id,
            None => self.fresh.next(),
        };
        let ports = port_entries(&grants, rules);
        self.used.insert(
            id,
            Ruleset {
                grants: grants.clone(),
                ports,
            },
        );
        self.ids.insert(grants, id);
        id
    }
}
