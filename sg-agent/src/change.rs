//! What changed between two states, in security-group terms: groups, rules (by stable
//! id), members and interfaces added and removed. The agent logs it for every change it
//! applies, and `sg-agent diff` prints it before one is applied (SPEC §5, §7).

#![forbid(unsafe_code)]

use std::collections::{BTreeMap, BTreeSet};

use crate::{
    compile::stable_rule_ids,
    model::{Direction, State},
};

/// A rule in words, with its stable id.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct RuleChange {
    pub group_id: String,
    pub direction: String,
    pub rule_id: String,
    pub rule: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ChangeSummary {
    pub groups_added: Vec<String>,
    pub groups_removed: Vec<String>,
    pub rules_added: Vec<RuleChange>,
    pub rules_removed: Vec<RuleChange>,
    /// (group, network interface) pairs.
    pub members_added: Vec<(String, String)>,
    pub members_removed: Vec<(String, String)>,
    pub interfaces_added: Vec<String>,
    pub interfaces_removed: Vec<String>,
    /// Prefix lists added, removed or with other entries.
    pub prefix_lists_changed: Vec<String>,
    /// Interfaces whose addresses or MAC changed (their members' prefixes move).
    pub interfaces_changed: Vec<String>,
}

fn rules_of(state: &State) -> BTreeMap<String, RuleChange> {
    let mut out = BTreeMap::new();
    for g in &state.security_groups {
        for direction in Direction::BOTH {
            let rules = g.rules(direction);
            let peer_word = if direction == Direction::Ingress {
                "from"
            } else {
                "to"
            };
            for (rule, id) in rules.iter().zip(stable_rule_ids(&g.id, direction, rules)) {
                let peers: Vec<String> = rule.peers.iter().map(|p| p.to_string()).collect();
                out.insert(
                    format!("{}/{id}", g.id),
                    RuleChange {
                        group_id: g.id.clone(),
                        direction: direction.to_string(),
                        rule_id: id,
                        rule: format!(
                            "{} {} {peer_word} {}",
                            rule.protocol,
                            rule.ports,
                            peers.join(", ")
                        ),
                    },
                );
            }
        }
    }
    out
}

fn added_removed<T: Ord + Clone>(old: &BTreeSet<T>, new: &BTreeSet<T>) -> (Vec<T>, Vec<T>) {
    (
        new.difference(old).cloned().collect(),
        old.difference(new).cloned().collect(),
    )
}

impl ChangeSummary {
    pub fn between(old: &State, new: &State) -> ChangeSummary {
        let ids = |s: &State| -> BTreeSet<String> {
            s.security_groups.iter().map(|g| g.id.clone()).collect()
        };
        let (groups_added, groups_removed) = added_removed(&ids(old), &ids(new));
        let (old_rules, new_rules) = (rules_of(old), rules_of(new));
        let keys = |m: &BTreeMap<String, RuleChange>| m.keys().cloned().collect::<BTreeSet<_>>();
        let (added, removed) = added_removed(&keys(&old_rules), &keys(&new_rules));
        let members = |s: &State| -> BTreeSet<(String, String)> {
            s.network_interfaces
                .iter()
                .flat_map(|n| n.groups.iter().map(|g| (g.clone(), n.id.clone())))
                .collect()
        };
        let (members_added, members_removed) = added_removed(&members(old), &members(new));
        let enis = |s: &State| -> BTreeSet<String> {
            s.network_interfaces.iter().map(|n| n.id.clone()).collect()
        };
        let (interfaces_added, interfaces_removed) = added_removed(&enis(old), &enis(new));
        let mut prefix_lists_changed: BTreeSet<String> = BTreeSet::new();
        for p in &old.prefix_lists {
            if new.prefix_list(&p.id) != Some(p) {
                prefix_lists_changed.insert(p.id.clone());
            }
        }
        for p in &new.prefix_lists {
            if old.prefix_list(&p.id).is_none() {
                prefix_lists_changed.insert(p.id.clone());
            }
        }
        // By id, not `State::interface` (a scan) per interface: a full apply of 100k
        // interfaces after another compares them in one pass.
        let old_by_id: std::collections::HashMap<&str, &crate::model::NetworkInterface> = old
            .network_interfaces
            .iter()
            .map(|n| (n.id.as_str(), n))
            .collect();
        let interfaces_changed = new
            .network_interfaces
            .iter()
            .filter(|n| {
                old_by_id
                    .get(n.id.as_str())
                    .is_some_and(|o| o.mac != n.mac || o.ipv4 != n.ipv4 || o.ipv6 != n.ipv6)
            })
            .map(|n| n.id.clone())
            .collect();
        ChangeSummary {
            groups_added,
            groups_removed,
            rules_added: added.iter().map(|k| new_rules[k].clone()).collect(),
            rules_removed: removed.iter().map(|k| old_rules[k].clone()).collect(),
            members_added,
            members_removed,
            interfaces_added,
            interfaces_removed,
            prefix_lists_changed: prefix_lists_changed.into_iter().collect(),
            interfaces_changed,
        }
    }

    pub fn is_empty(&self) -> bool {
        *self == ChangeSummary::default()
    }

    /// One line for the log: counts, and the first few names of each kind.
    pub fn one_line(&self) -> String {
        fn part<T>(out: &mut Vec<String>, what: &str, items: &[T], name: impl Fn(&T) -> String) {
            if items.is_empty() {
                return;
            }
            let mut names: Vec<String> = items.iter().take(3).map(name).collect();
            if items.len() > 3 {
                names.push(format!("… {} more", items.len() - 3));
            }
            out.push(format!("{what} {} [{}]", items.len(), names.join(", ")));
        }
        let mut out = Vec::new();
        part(&mut out, "+groups", &self.groups_added, |g| g.clone());
        part(&mut out, "-groups", &self.groups_removed, |g| g.clone());
        part(&mut out, "+rules", &self.rules_added, |r| {
            format!("{} {}", r.group_id, r.rule_id)
        });
        part(&mut out, "-rules", &self.rules_removed, |r| {
            format!("{} {}", r.group_id, r.rule_id)
        });
        part(&mut out, "+members", &self.members_added, |(g, n)| {
            format!("{n} in {g}")
        });
        part(&mut out, "-members", &self.members_removed, |(g, n)| {
            format!("{n} in {g}")
        });
        part(&mut out, "+interfaces", &self.interfaces_added, |n| {
            n.clone()
        });
        part(&mut out, "-interfaces", &self.interfaces_removed, |n| {
            n.clone()
        });
        part(&mut out, "~interfaces", &self.interfaces_changed, |n| {
            n.clone()
        });
        part(&mut out, "~prefix lists", &self.prefix_lists_changed, |p| {
            p.clone()
        });
        if out.is_empty() {
            "no change".into()
        } else {
            out.join("; ")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OLD: &str = r#"
[[security_group]]
id = "sg-web"
ingress = [{ protocol = "tcp", ports = "443", from = ["0.0.0.0/0"] }]

[[security_group]]
id = "sg-db"
ingress = [{ protocol = "tcp", ports = "5432", from = ["sg-web"] }]

[[interface]]
id = "eni-web1"
ipv4 = ["198.18.1.1"]
groups = ["sg-web"]
"#;

    #[test]
    fn names_what_was_added_and_removed() {
        let old = crate::source::parse_str(OLD).expect("valid");
        let new_text = OLD.replace("5432", "5433").replace(
            "groups = [\"sg-web\"]",
            "groups = [\"sg-web\", \"sg-db\"]",
        ) + "\n[[interface]]\nid = \"eni-web2\"\nipv4 = [\"198.18.1.2\"]\ngroups = [\"sg-web\"]\n";
        let new = crate::source::parse_str(&new_text).expect("valid");
        let c = ChangeSummary::between(&old, &new);
        assert_eq!(c.rules_added.len(), 1);
        assert_eq!(c.rules_removed.len(), 1);
        assert!(c.rules_added[0].rule.contains("5433"));
        assert_eq!(
            c.members_added,
            vec![
                ("sg-db".to_string(), "eni-web1".to_string()),
                ("sg-web".to_string(), "eni-web2".to_string())
            ]
        );
        assert_eq!(c.interfaces_added, vec!["eni-web2".to_string()]);
        assert!(c.one_line().contains("+members 2"), "{}", c.one_line());
        assert!(ChangeSummary::between(&new, &new).is_empty());
    }

    #[test]
    fn an_unrelated_edit_keeps_rule_ids() {
        let old = crate::source::parse_str(OLD).expect("valid");
        let new =
            crate::source::parse_str(&OLD.replace("198.18.1.1", "198.18.1.9")).expect("valid");
        let c = ChangeSummary::between(&old, &new);
        assert!(
            c.rules_added.is_empty() && c.rules_removed.is_empty(),
            "{c:?}"
        );
        assert_eq!(c.interfaces_changed, vec!["eni-web1".to_string()]);
    }
}
