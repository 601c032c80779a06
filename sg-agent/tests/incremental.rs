//! Incremental re-parsing (source::Document): for random edits of random state files in
//! both formats, the state after `update` is exactly what parsing the whole new file
//! gives, and edits confined to interfaces do take the incremental path.

use std::path::Path;

use sg_agent::{
    model::State,
    source::{parse_str, Document},
    testgen::Rng,
};

/// One interface item of a generated file.
#[derive(Clone)]
struct Item {
    id: String,
    v4: u32,
    groups: Vec<&'static str>,
    mac: Option<u8>,
    timeouts: bool,
}

const GROUPS: [&str; 3] = ["sg-a", "sg-b", "sg-c"];

fn random_item(rng: &mut Rng, n: u32) -> Item {
    let groups = match rng.below(4) {
        0 => vec![],
        1 => vec!["sg-a"],
        2 => vec!["sg-b", "sg-c"],
        _ => vec![*rng.pick(&GROUPS)],
    };
    Item {
        id: format!("eni-{n}"),
        v4: rng.below(200) as u32,
        groups,
        mac: rng.chance(20).then_some(n as u8),
        timeouts: rng.chance(15),
    }
}

fn toml_item(it: &Item) -> String {
    let mut s = format!(
        "[[interface]]\nid = \"{}\"\nipv4 = [\"198.18.{}.{}\"]\ngroups = [{}]\n",
        it.id,
        it.v4 / 250,
        it.v4 % 250,
        it.groups
            .iter()
            .map(|g| format!("\"{g}\""))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if let Some(m) = it.mac {
        s += &format!("mac = \"02:00:00:00:00:{m:02x}\"\n");
    }
    if it.timeouts {
        s += "[interface.timeouts]\ntcp_established = 600\n";
    }
    s
}

fn json_item(it: &Item) -> String {
    format!(
        "{{\"NetworkInterfaceId\": \"{}\",{} \"PrivateIpAddresses\": [{{\"PrivateIpAddress\": \"198.18.{}.{}\"}}], \"Groups\": [{}]}}",
        it.id,
        it.mac
            .map(|m| format!(" \"MacAddress\": \"02:00:00:00:00:{m:02x}\","))
            .unwrap_or_default(),
        it.v4 / 250,
        it.v4 % 250,
        it.groups
            .iter()
            .map(|g| format!("{{\"GroupId\": \"{g}\"}}"))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// A file with the groups (one of them after the interfaces in TOML) and `items`.
fn render(json: bool, items: &[Item], group_port: u16) -> String {
    if json {
        let list: Vec<String> = items.iter().map(json_item).collect();
        let groups: Vec<String> = GROUPS
            .iter()
            .map(|g| format!("{{\"GroupId\": \"{g}\", \"IpPermissions\": [{{\"IpProtocol\": \"tcp\", \"FromPort\": {group_port}, \"ToPort\": {group_port}, \"UserIdGroupPairs\": [{{\"GroupId\": \"sg-a\"}}]}}]}}"))
            .collect();
        format!(
            "{{\"NetworkInterfaces\": [\n  {}\n], \"SecurityGroups\": [{}]}}\n",
            list.join(",\n  "),
            groups.join(", ")
        )
    } else {
        let mut s = String::from("# generated\n");
        for g in &GROUPS[..2] {
            s += &format!("[[security_group]]\nid = \"{g}\"\ningress = [\n  {{ protocol = \"tcp\", ports = {group_port}, from = [\"sg-a\"], description = \"\"\"\n[[interface]]\"\"\" }},\n]\n\n");
        }
        let half = items.len() / 2;
        for it in &items[..half] {
            s += &toml_item(it);
            s += "\n";
        }
        s += &format!("[[security_group]]\nid = \"{}\"\n\n", GROUPS[2]);
        for it in &items[half..] {
            s += &toml_item(it);
        }
        s
    }
}

/// The state of the whole file, if it is valid.
fn full(text: &str) -> Option<State> {
    parse_str(text).ok()
}

#[test]
fn incremental_updates_equal_full_parses() {
    let mut rng = Rng::new(7);
    let mut incremental = 0;
    for round in 0..300 {
        let json = round % 2 == 0;
        let mut next = 0;
        let mut items: Vec<Item> = (0..rng.below(12) + 1)
            .map(|_| {
                next += 1;
                random_item(&mut rng, next)
            })
            .collect();
        let mut port = 80;
        let text = render(json, &items, port);
        let Some(mut state) = full(&text) else {
            continue;
        };
        let mut doc = Document::new(text.into_bytes(), &state);
        for _ in 0..8 {
            let interfaces_only = match rng.below(7) {
                0 | 1 => {
                    next += 1;
                    let at = rng.below(items.len() as u64 + 1) as usize;
                    items.insert(at, random_item(&mut rng, next));
                    true
                }
                2 if items.len() > 1 => {
                    items.remove(rng.below(items.len() as u64) as usize);
                    true
                }
                3 => {
                    let at = rng.below(items.len() as u64) as usize;
                    let n = items[at].id[4..].parse().unwrap();
                    items[at] = random_item(&mut rng, n);
                    true
                }
                4 => {
                    // A duplicate id: invalid, never applied incrementally.
                    let at = rng.below(items.len() as u64) as usize;
                    let copy = items[at].clone();
                    items.push(copy);
                    true
                }
                5 => {
                    port += 1;
                    false
                }
                _ => true,
            };
            let text = render(json, &items, port);
            let expected = full(&text);
            let before = state.clone();
            match doc.update(&mut state, text.clone().into_bytes()) {
                Ok(change) => {
                    incremental += 1;
                    assert!(
                        interfaces_only,
                        "a group change was taken as an interface change"
                    );
                    let expected = expected.expect("an invalid file was applied");
                    assert_eq!(state, expected, "round {round}: incremental != full");
                    assert_eq!(
                        state.network_interfaces.len() + change.removed.len(),
                        before.network_interfaces.len() + change.added
                    );
                }
                Err(_) => {
                    assert_eq!(state, before, "a refused update changed the state");
                    match expected {
                        Some(s) => {
                            doc = Document::new(text.into_bytes(), &s);
                            state = s;
                        }
                        None => {
                            // Invalid: the last valid state stays, and so does its text.
                            items.pop();
                        }
                    }
                }
            }
            let again = render(json, &items, port);
            if full(&again).is_none() {
                break;
            }
        }
    }
    eprintln!("{incremental} incremental updates");
    assert!(
        incremental > 600,
        "only {incremental} updates were incremental"
    );
}

/// 1000 interfaces of `sg-a`, item i with timeouts when `timeouts(i)`.
fn large(timeouts: impl Fn(u32) -> bool) -> Vec<Item> {
    (0..1000)
        .map(|i| Item {
            id: format!("eni-{i}"),
            v4: i,
            groups: vec!["sg-a"],
            mac: None,
            timeouts: timeouts(i),
        })
        .collect()
}

#[test]
fn a_member_appended_to_a_large_file_is_incremental() {
    let path = Path::new("state.toml");
    let items = large(|_| false);
    for json in [false, true] {
        let text = render(json, &items, 80);
        let (mut doc, mut state) = Document::parse(path, text.into_bytes()).unwrap();
        let mut more = items.clone();
        more.push(Item {
            id: "eni-new".into(),
            v4: 1001,
            groups: vec!["sg-b"],
            mac: None,
            timeouts: false,
        });
        let change = doc
            .update(&mut state, render(json, &more, 80).into_bytes())
            .expect("incremental");
        assert_eq!((change.removed.len(), change.added), (1, 2));
        assert_eq!(state.network_interfaces.last().unwrap().id, "eni-new");
    }
}

#[test]
fn a_member_removed_from_a_large_file_is_incremental() {
    let path = Path::new("state.toml");
    let items = large(|i| i % 3 == 0);
    // The file with item `i`'s text cut out, as an operator's edit would.
    let without = |json: bool, text: &str, i: usize| -> String {
        let item = if json {
            let it = json_item(&items[i]);
            if i + 1 == items.len() {
                format!(",\n  {it}")
            } else {
                format!("{it},\n  ")
            }
        } else if i < items.len() / 2 {
            format!("{}\n", toml_item(&items[i]))
        } else {
            toml_item(&items[i])
        };
        assert!(text.contains(&item));
        text.replacen(&item, "", 1)
    };
    for json in [false, true] {
        for gone in [999, 500, 0] {
            let text = render(json, &items, 80);
            let (mut doc, mut state) = Document::parse(path, text.clone().into_bytes()).unwrap();
            let new = without(json, &text, gone);
            let change = doc
                .update(&mut state, new.clone().into_bytes())
                .unwrap_or_else(|_| {
                    panic!("removing eni-{gone} (json: {json}) took the full path")
                });
            assert_eq!(change.removed.len(), change.added + 1);
            assert!(change.removed.iter().any(|n| n.id == format!("eni-{gone}")));
            assert_eq!(
                state,
                full(&new).unwrap(),
                "removing eni-{gone} (json: {json})"
            );
            // The document follows: the next removal is incremental too.
            let next = without(json, &new, 600);
            doc.update(&mut state, next.clone().into_bytes())
                .unwrap_or_else(|_| {
                    panic!("the change after removing eni-{gone} took the full path")
                });
            assert_eq!(state, full(&next).unwrap());
        }
    }
}

/// A plan by content: every prefix with its ruleset's grants and port entries (ruleset
/// ids may differ between an incremental change and a full compile).
fn by_content(
    plan: &sg_agent::compile::Plan,
) -> Vec<(
    sg_agent::compile::PrefixKey,
    Vec<sg_agent::compile::RuleGrant>,
    String,
)> {
    let mut out: Vec<_> = plan
        .prefixes
        .iter()
        .map(|(k, id)| {
            let r = &plan.rulesets[id];
            (
                *k,
                r.grants.iter().copied().collect(),
                format!("{:?}", r.ports),
            )
        })
        .collect();
    out.sort();
    out
}

#[test]
fn membership_changes_equal_full_compiles() {
    use sg_agent::compile::{
        changed_addresses, changed_interfaces, compile, membership_change, ChangedAddress, Options,
        PlanIndex,
    };
    use sg_agent::testgen;
    let mut rng = Rng::new(11);
    let mut ops = 0;
    for round in 0..400 {
        let mut state = testgen::state(&mut rng, 6);
        let n_locals = 1 + rng.below(2) as usize;
        let locals = testgen::locals(&state, n_locals);
        let options = Options {
            default_deny: rng.chance(30),
            audit: false,
        };
        let mut plan = compile(&state, &locals, &options, None);
        let mut index = PlanIndex::new(&plan);
        for step in 0..6 {
            // Edit, add or remove a non-local interface.
            let mut changed = vec![];
            // The interfaces the change added and removed, as the agent's re-parse gives.
            let (mut added, mut removed) = (vec![], vec![]);
            let mut fresh = testgen::state(&mut rng, 2).network_interfaces.remove(0);
            fresh.groups.retain(|g| state.group(g).is_some());
            let others = state.network_interfaces.len() - n_locals;
            match rng.below(3) {
                0 if others > 0 => {
                    let at = n_locals + rng.below(others as u64) as usize;
                    let old = state.network_interfaces.remove(at);
                    changed.extend(old.addresses());
                    removed.push(old);
                }
                1 if others > 0 => {
                    let at = n_locals + rng.below(others as u64) as usize;
                    let old = &mut state.network_interfaces[at];
                    changed.extend(old.addresses());
                    fresh.id = old.id.clone();
                    changed.extend(fresh.addresses());
                    removed.push(old.clone());
                    added.push(fresh.clone());
                    *old = fresh;
                }
                _ => {
                    fresh.id = format!("eni-new-{round}-{step}");
                    // Sometimes an address another interface already has.
                    if rng.chance(30) {
                        if let Some(a) = state.network_interfaces[0].ipv4.first() {
                            fresh.ipv4.push(*a);
                        }
                    }
                    changed.extend(fresh.addresses());
                    added.push(fresh.clone());
                    state.network_interfaces.push(fresh);
                }
            }
            let full = compile(&state, &locals, &options, Some(&plan));
            // Half the time the changed addresses come from the agent's own logic (which
            // tells the groups of addresses only added interfaces hold), half the time
            // each address is left to membership_change to look up.
            let holders = |a: &std::net::IpAddr| {
                state
                    .network_interfaces
                    .iter()
                    .filter(|n| n.addresses().any(|b| b == *a))
                    .count()
            };
            let changed: Vec<ChangedAddress> = if rng.chance(50) {
                let interfaces = changed_interfaces(&added, &removed);
                changed_addresses(&interfaces, &added, holders)
            } else {
                changed
                    .iter()
                    .map(|a| ChangedAddress {
                        addr: *a,
                        groups: None,
                    })
                    .collect()
            };
            let change = membership_change(&state, &mut plan, &mut index, &changed)
                .expect("locals are in the state");
            ops += change.ops.len();
            assert_eq!(
                by_content(&plan),
                by_content(&full),
                "round {round} step {step}"
            );
            assert_eq!(
                plan.rulesets.len(),
                full.rulesets.len(),
                "unused rulesets kept"
            );
            let fresh_index = PlanIndex::new(&plan);
            assert_eq!(
                format!("{:?}", fresh_index.users_sorted()),
                format!("{:?}", index.users_sorted())
            );
        }
    }
    assert!(
        ops > 500,
        "only {ops} operations: the changes did not matter"
    );
}

#[test]
fn the_examples_take_the_incremental_path() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let toml = std::fs::read_to_string(dir.join("two-tier.toml")).unwrap();
    let (mut doc, mut state) = Document::parse(Path::new("x"), toml.clone().into_bytes()).unwrap();
    let joined = format!("{toml}\n[[interface]]\nid = \"eni-web3\"\nipv4 = [\"198.18.1.13\"]\ngroups = [\"sg-0a00000000000web\"]\n");
    let change = doc.update(&mut state, joined.into_bytes());
    assert!(change.is_ok());
}

/// etcd's incremental path (`source::etcd::apply_interfaces`): for random watch responses
/// that change network interfaces (edits, joins, leaves, clashing addresses, unknown
/// groups), the state after the response is exactly the full decode of etcd's new
/// content, and the response takes the incremental path exactly when that content is
/// valid.
#[test]
fn etcd_watch_responses_equal_full_decodes() {
    use sg_agent::{
        source::etcd::{apply_interfaces, document, objects, Digest},
        testgen,
    };
    const PREFIX: &str = "/sg/";
    let decode = |kvs: &std::collections::BTreeMap<String, String>| {
        parse_str(&document(PREFIX, kvs).unwrap()).ok()
    };
    let (mut incremental, mut full_only) = (0, 0);
    for seed in 0..300u64 {
        let mut rng = Rng::new(seed);
        let generated = testgen::state(&mut rng, 6);
        let mut kvs = objects(PREFIX, &generated);
        let Some(mut state) = decode(&kvs) else {
            continue;
        };
        for step in 0..8 {
            // One response: up to three keys, each an edit, a new interface or a deletion.
            let mut changes = Vec::new();
            let mut touched = std::collections::BTreeSet::new();
            for _ in 0..1 + rng.below(3) {
                let n = rng.below(state.network_interfaces.len() as u64 + 2) as usize;
                let mut eni = match state.network_interfaces.get(n) {
                    Some(e) if !rng.chance(20) => e.clone(),
                    _ => testgen::state(&mut rng, 1).network_interfaces[0].clone(),
                };
                if state.network_interfaces.get(n).is_none() {
                    eni.id = format!("eni-new-{seed}-{step}-{n}");
                }
                let one = State {
                    network_interfaces: vec![eni.clone()],
                    ..State::default()
                };
                let (key, value) = objects(PREFIX, &one).into_iter().next().unwrap();
                if !touched.insert(key.clone()) {
                    continue;
                }
                let value = match rng.below(10) {
                    0 if kvs.contains_key(&key) => None,
                    1 => {
                        // Joins a group, maybe one that does not exist.
                        eni.groups
                            .push(["sg-0", "sg-1", "sg-9"][rng.below(3) as usize].to_string());
                        eni.groups.dedup();
                        let one = State {
                            network_interfaces: vec![eni],
                            ..State::default()
                        };
                        objects(PREFIX, &one).into_values().next()
                    }
                    2 => {
                        // Takes an address that may be another interface's.
                        eni.ipv4.push(testgen::pool_v4(&mut rng));
                        let one = State {
                            network_interfaces: vec![eni],
                            ..State::default()
                        };
                        objects(PREFIX, &one).into_values().next()
                    }
                    _ => Some(value),
                };
                changes.push((key, value));
            }
            let mut next = state.clone();
            let delta = apply_interfaces(PREFIX, &kvs, &mut next, &changes);
            let mut digest = Digest::of(PREFIX, &kvs);
            for (k, v) in &changes {
                if let Some(old) = kvs.get(k) {
                    digest.toggle(PREFIX, k, old);
                }
                match v {
                    Some(v) => {
                        digest.toggle(PREFIX, k, v);
                        kvs.insert(k.clone(), v.clone());
                    }
                    None => {
                        kvs.remove(k);
                    }
                }
            }
            assert_eq!(digest, Digest::of(PREFIX, &kvs), "seed {seed} step {step}");
            let full = decode(&kvs);
            match (delta, full) {
                (Some(_), Some(full)) => {
                    assert_eq!(
                        next.network_interfaces, full.network_interfaces,
                        "seed {seed} step {step}: {changes:?}"
                    );
                    incremental += 1;
                    state = full;
                }
                (None, Some(full)) => {
                    // Only a state whose decode differs in more than interfaces could
                    // need the full path; responses here change interfaces only.
                    panic!("seed {seed} step {step}: valid content took the full path: {changes:?} -> {:?}", full.network_interfaces);
                }
                (Some(_), None) => {
                    panic!("seed {seed} step {step}: invalid content applied incrementally: {changes:?}")
                }
                (None, None) => {
                    assert_eq!(next.network_interfaces, state.network_interfaces);
                    full_only += 1;
                    // etcd holds an invalid state now: the agent keeps the last valid
                    // one; start the next seed's steps from valid content again.
                    break;
                }
            }
        }
    }
    eprintln!("{incremental} incremental responses, {full_only} invalid ones refused");
    assert!(incremental > 300 && full_only > 20);
}
