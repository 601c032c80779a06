//! Ordered map operations between two plans.

#![forbid(unsafe_code)]

use sg_common::Grant;

use super::InterfacePlan;
use crate::net::Family;

use super::{Plan, PortPrefix, PrefixKey};

/// One update of one map, in the order the datapath must apply it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MapOp {
    /// Settings of an enforced interface; `fresh` when it was not enforced before (its
    /// counter slot is zeroed first).
    PutInterface {
        ifindex: u32,
        /// Boxed: the other operations are small, and a start programs a few hundred
        /// thousand of them.
        plan: Box<InterfacePlan>,
        fresh: bool,
    },
    DeleteInterface {
        ifindex: u32,
    },
    PutPort {
        ruleset: u32,
        prefix: PortPrefix,
        grant: Grant,
    },
    DeletePort {
        ruleset: u32,
        prefix: PortPrefix,
    },
    PutPrefix {
        key: PrefixKey,
        ruleset: u32,
    },
    DeletePrefix {
        key: PrefixKey,
    },
}

/// The ordered map operations that turn `old` into `new`, such that no intermediate state
/// denies a packet both plans allow or allows a packet both deny:
/// 1. settings of interfaces enforced before and after;
/// 2. port entries of new rulesets (rulesets never change content: new content, new id);
/// 3. address prefixes, longest first, so an address never falls back to a shorter
///    prefix's *new* ruleset before its own longer prefix is in place;
/// 4. newly enforced interfaces, now that their maps are full;
/// 5. interfaces no longer enforced, then stale prefixes, then stale rulesets.
pub fn diff(old: &Plan, new: &Plan) -> Vec<MapOp> {
    let mut ops = Vec::new();
    for (ifindex, plan) in &new.interfaces {
        if old.interfaces.get(ifindex).is_some_and(|o| o != plan) {
            ops.push(MapOp::PutInterface {
                ifindex: *ifindex,
                plan: Box::new(plan.clone()),
                fresh: false,
            });
        }
    }
    for (id, ruleset) in &new.rulesets {
        let old_ports = old.rulesets.get(id).map(|r| &r.ports);
        for (prefix, grant) in &ruleset.ports {
            if old_ports.and_then(|p| p.get(prefix)) != Some(grant) {
                ops.push(MapOp::PutPort {
                    ruleset: *id,
                    prefix: *prefix,
                    grant: *grant,
                });
            }
        }
    }
    // Both maps are sorted by key: one merge pass finds what to put and what to delete.
    let (mut puts, mut stale): (Vec<(&PrefixKey, u32)>, Vec<PrefixKey>) = (vec![], vec![]);
    let (mut a, mut b) = (
        old.prefixes.iter().peekable(),
        new.prefixes.iter().peekable(),
    );
    loop {
        match (a.peek(), b.peek()) {
            (Some((ka, va)), Some((kb, vb))) => match ka.cmp(kb) {
                std::cmp::Ordering::Less => {
                    stale.push(**ka);
                    a.next();
                }
                std::cmp::Ordering::Greater => {
                    puts.push((kb, **vb));
                    b.next();
                }
                std::cmp::Ordering::Equal => {
                    if va != vb {
                        puts.push((kb, **vb));
                    }
                    a.next();
                    b.next();
                }
            },
            (Some((ka, _)), None) => {
                stale.push(**ka);
                a.next();
            }
            (None, Some((kb, vb))) => {
                puts.push((kb, **vb));
                b.next();
            }
            (None, None) => break,
        }
    }
    puts.sort_by_key(|(k, _)| {
        std::cmp::Reverse(k.cidr.len() as u32 + if k.cidr.family() == Family::V4 { 96 } else { 0 })
    });
    ops.extend(
        puts.into_iter()
            .map(|(key, ruleset)| MapOp::PutPrefix { key: *key, ruleset }),
    );
    for (ifindex, plan) in &new.interfaces {
        if !old.interfaces.contains_key(ifindex) {
            ops.push(MapOp::PutInterface {
                ifindex: *ifindex,
                plan: Box::new(plan.clone()),
                fresh: true,
            });
        }
    }
    for ifindex in old.interfaces.keys() {
        if !new.interfaces.contains_key(ifindex) {
            ops.push(MapOp::DeleteInterface { ifindex: *ifindex });
        }
    }
    ops.extend(stale.into_iter().map(|key| MapOp::DeletePrefix { key }));
    for (id, ruleset) in &old.rulesets {
        let new_ports = new.rulesets.get(id).map(|r| &r.ports);
        for prefix in ruleset.ports.keys() {
            if new_ports.is_none_or(|p| !p.contains_key(prefix)) {
                ops.push(MapOp::DeletePort {
                    ruleset: *id,
                    prefix: *prefix,
                });
            }
        }
    }
    ops
}
