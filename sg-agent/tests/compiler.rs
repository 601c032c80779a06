//! The compiler against the SPEC: table-driven cases named after the SPEC points they
//! prove, differential property tests against the reference evaluator, and the plan-diff
//! ordering invariant checked at every intermediate state.

use std::net::IpAddr;

use proptest::prelude::*;
use sg_agent::{
    compile::{compile, diff, LocalInterface, MapOp, Options, Plan, PlanVerdict},
    eval::{evaluate, Packet, Verdict},
    model::{Direction, State},
    source::parse_str,
    testgen::{self, Rng},
};
use sg_common::{GRANT_UNTRACKED_TCP, GRANT_UNTRACKED_UDP};

const IN: Direction = Direction::Ingress;
const OUT: Direction = Direction::Egress;

fn state(text: &str) -> State {
    parse_str(text).unwrap_or_else(|p| panic!("test state invalid: {p:#?}"))
}

fn locals(state: &State) -> Vec<LocalInterface> {
    testgen::locals(state, state.network_interfaces.len())
}

fn plan(state: &State) -> Plan {
    compile(state, &locals(state), &Options::default(), None)
}

fn ifindex(state: &State, eni: &str) -> u32 {
    locals(state)
        .iter()
        .find(|l| l.eni == eni)
        .expect("eni")
        .ifindex
}

/// One case: interface, direction, protocol, remote, port (or ICMP type<<8|code), verdict.
type Case = (&'static str, Direction, u8, &'static str, u16, bool);

/// Checks every case through both the compiled plan and the reference evaluator.
fn check(name: &str, text: &str, cases: &[Case]) {
    let s = state(text);
    let p = plan(&s);
    for (i, &(eni, direction, protocol, remote, port, want)) in cases.iter().enumerate() {
        let remote: IpAddr = remote.parse().unwrap();
        let got = p
            .lookup(ifindex(&s, eni), direction, remote, protocol, port)
            .allows();
        let reference = evaluate(
            &s,
            eni,
            &Packet {
                direction,
                protocol,
                remote,
                port,
            },
            false,
        )
        .allows();
        assert_eq!(got, want, "{name} case {i}: plan verdict for {eni} {direction} proto {protocol} {remote} port {port}");
        assert_eq!(reference, want, "{name} case {i}: reference verdict");
    }
}

const TWO_TIER: &str = r#"
[[security_group]]
id = "sg-web"
name = "web-sg"
ingress = [
  { protocol = "tcp", ports = "80", from = ["0.0.0.0/0", "::/0"] },
  { protocol = "tcp", ports = "443", from = ["0.0.0.0/0", "::/0"] },
  { protocol = "tcp", ports = 22, from = ["198.18.9.9/32"] },
]

[[security_group]]
id = "sg-db"
name = "db-sg"
ingress = [{ protocol = "tcp", ports = "3306", from = ["sg-web"] }]

[[interface]]
id = "eni-web1"
ipv4 = ["198.18.1.10"]
ipv6 = ["2001:db8:1::10"]
groups = ["sg-web"]

[[interface]]
id = "eni-web2"
ipv4 = ["198.18.1.11"]
groups = ["sg-web"]

[[interface]]
id = "eni-db"
ipv4 = ["198.18.2.10"]
groups = ["sg-db"]

[[interface]]
id = "eni-other"
ipv4 = ["198.18.3.10"]
groups = []
"#;

#[test]
fn spec_1_1_allow_only_and_1_6_group_references_two_tier() {
    check(
        "two-tier",
        TWO_TIER,
        &[
            ("eni-web1", IN, 6, "198.18.200.1", 80, true),
            ("eni-web1", IN, 6, "2001:db8:ff::1", 443, true),
            ("eni-web1", IN, 6, "198.18.200.1", 22, false),
            ("eni-web1", IN, 6, "198.18.9.9", 22, true),
            ("eni-web1", IN, 17, "198.18.200.1", 80, false),
            ("eni-db", IN, 6, "198.18.1.10", 3306, true),
            ("eni-db", IN, 6, "198.18.1.11", 3306, true),
            ("eni-db", IN, 6, "2001:db8:1::10", 3306, true),
            ("eni-db", IN, 6, "198.18.3.10", 3306, false),
            ("eni-db", IN, 6, "198.18.1.10", 3307, false),
            ("eni-db", OUT, 6, "198.18.77.1", 5555, true),
        ],
    );
}

#[test]
fn spec_1_2_defaults_new_group_has_no_ingress_and_all_egress() {
    check(
        "defaults",
        r#"
[[security_group]]
id = "sg-a"
[[interface]]
id = "eni-a"
groups = ["sg-a"]
"#,
        &[
            ("eni-a", IN, 6, "198.18.0.1", 80, false),
            ("eni-a", IN, 1, "198.18.0.1", 8 << 8, false),
            ("eni-a", OUT, 6, "198.18.0.1", 80, true),
            ("eni-a", OUT, 17, "2001:db8::1", 53, true),
            ("eni-a", OUT, 47, "198.18.0.1", 0, true),
        ],
    );
}

#[test]
fn spec_1_2_interface_without_groups_is_not_enforced_unless_default_deny() {
    let s = state(TWO_TIER);
    let p = plan(&s);
    let other = ifindex(&s, "eni-other");
    let remote: IpAddr = "198.18.0.1".parse().unwrap();
    assert_eq!(p.lookup(other, IN, remote, 6, 80), PlanVerdict::NotEnforced);
    let strict = compile(
        &s,
        &locals(&s),
        &Options {
            default_deny: true,
            ..Default::default()
        },
        None,
    );
    assert_eq!(strict.lookup(other, IN, remote, 6, 80), PlanVerdict::Deny);
    assert_eq!(strict.lookup(other, OUT, remote, 6, 80), PlanVerdict::Deny);
}

#[test]
fn spec_1_5_rule_fields_protocols_ports_icmp() {
    check(
        "fields",
        r#"
[[security_group]]
id = "sg-a"
ingress = [
  { protocol = "tcp", ports = "1000-2000", from = ["198.18.0.0/16"] },
  { protocol = "udp", ports = "53", from = ["198.18.0.0/16"] },
  { protocol = "icmp", icmp_type = 8, icmp_code = -1, from = ["198.18.0.0/16"] },
  { protocol = "icmp", icmp_type = 3, icmp_code = 4, from = ["198.18.0.0/16"] },
  { protocol = "icmpv6", icmp_type = -1, from = ["2001:db8::/32"] },
  { protocol = 47, from = ["198.18.0.0/16"] },
  { protocol = "1", icmp_type = 13, from = ["198.18.5.0/24"] },
  { protocol = "-1", from = ["198.19.0.0/16"] },
]
egress = []
[[interface]]
id = "eni-a"
groups = ["sg-a"]
"#,
        &[
            ("eni-a", IN, 6, "198.18.0.1", 999, false),
            ("eni-a", IN, 6, "198.18.0.1", 1000, true),
            ("eni-a", IN, 6, "198.18.0.1", 1500, true),
            ("eni-a", IN, 6, "198.18.0.1", 2000, true),
            ("eni-a", IN, 6, "198.18.0.1", 2001, false),
            ("eni-a", IN, 17, "198.18.0.1", 53, true),
            ("eni-a", IN, 17, "198.18.0.1", 54, false),
            ("eni-a", IN, 1, "198.18.0.1", 8 << 8, true),
            ("eni-a", IN, 1, "198.18.0.1", 8 << 8 | 7, true),
            ("eni-a", IN, 1, "198.18.0.1", 0, false),
            ("eni-a", IN, 1, "198.18.0.1", 3 << 8 | 4, true),
            ("eni-a", IN, 1, "198.18.0.1", 3 << 8 | 3, false),
            ("eni-a", IN, 58, "2001:db8::5", 128 << 8, true),
            ("eni-a", IN, 58, "2001:db9::5", 128 << 8, false),
            ("eni-a", IN, 47, "198.18.0.1", 0, true),
            ("eni-a", IN, 50, "198.18.0.1", 0, false),
            ("eni-a", IN, 1, "198.18.5.1", 13 << 8, true),
            ("eni-a", IN, 1, "198.18.6.1", 13 << 8, false),
            ("eni-a", IN, 132, "198.19.1.1", 0, true),
            ("eni-a", IN, 6, "198.19.1.1", 65535, true),
            ("eni-a", OUT, 6, "198.18.0.1", 80, false),
        ],
    );
}

#[test]
fn spec_1_6_empty_group_reference_matches_nothing() {
    check(
        "empty group",
        r#"
[[security_group]]
id = "sg-empty"
[[security_group]]
id = "sg-a"
ingress = [{ protocol = "all", from = ["sg-empty"] }]
[[interface]]
id = "eni-a"
groups = ["sg-a"]
"#,
        &[
            ("eni-a", IN, 6, "198.18.0.1", 80, false),
            ("eni-a", IN, 6, "0.0.0.0", 80, false),
            ("eni-a", IN, 6, "2001:db8::1", 80, false),
        ],
    );
}

#[test]
fn spec_1_6_self_reference_and_secondary_addresses() {
    check(
        "self reference",
        r#"
[[security_group]]
id = "sg-a"
ingress = [{ protocol = "tcp", ports = "5000", from = ["sg-a"] }]
[[interface]]
id = "eni-a"
ipv4 = ["198.18.0.1", "198.18.0.2"]
groups = ["sg-a"]
[[interface]]
id = "eni-b"
ipv4 = ["198.18.0.3"]
ipv6 = ["2001:db8::3"]
groups = ["sg-a"]
"#,
        &[
            ("eni-a", IN, 6, "198.18.0.3", 5000, true),
            ("eni-a", IN, 6, "2001:db8::3", 5000, true),
            ("eni-b", IN, 6, "198.18.0.2", 5000, true),
            ("eni-b", IN, 6, "198.18.0.4", 5000, false),
        ],
    );
}

#[test]
fn spec_1_6a_overlapping_peers_are_a_union() {
    check(
        "overlap",
        r#"
[[security_group]]
id = "sg-a"
ingress = [
  { protocol = "tcp", ports = "3306", from = ["198.18.0.0/24"] },
  { protocol = "all", from = ["0.0.0.0/0"] },
]
[[security_group]]
id = "sg-b"
ingress = [
  { protocol = "tcp", ports = "22", from = ["198.18.0.0/16"] },
  { protocol = "udp", ports = "53", from = ["198.18.0.5/32"] },
]
[[interface]]
id = "eni-a"
groups = ["sg-a"]
[[interface]]
id = "eni-b"
groups = ["sg-b"]
"#,
        &[
            ("eni-a", IN, 6, "198.18.0.5", 3307, true),
            ("eni-a", IN, 6, "198.18.0.5", 3306, true),
            ("eni-b", IN, 6, "198.18.0.5", 22, true),
            ("eni-b", IN, 17, "198.18.0.5", 53, true),
            ("eni-b", IN, 17, "198.18.0.6", 53, false),
            ("eni-b", IN, 6, "198.19.0.5", 22, false),
        ],
    );
}

#[test]
fn spec_1_7_prefix_lists() {
    check(
        "prefix lists",
        r#"
[[prefix_list]]
id = "pl-admins"
family = "ipv4"
entries = ["198.18.9.0/24", "198.19.0.7/32"]
[[prefix_list]]
id = "pl-v6"
family = "ipv6"
entries = ["2001:db8:9::/48"]
[[security_group]]
id = "sg-a"
ingress = [{ protocol = "tcp", ports = "22", from = ["pl-admins", "pl-v6"] }]
[[interface]]
id = "eni-a"
groups = ["sg-a"]
"#,
        &[
            ("eni-a", IN, 6, "198.18.9.1", 22, true),
            ("eni-a", IN, 6, "198.19.0.7", 22, true),
            ("eni-a", IN, 6, "198.19.0.8", 22, false),
            ("eni-a", IN, 6, "2001:db8:9::1", 22, true),
            ("eni-a", IN, 6, "2001:db8:a::1", 22, false),
        ],
    );
}

#[test]
fn spec_1_8_sixteen_groups_per_interface_are_unioned() {
    let mut text = String::new();
    for i in 0..16 {
        text += &format!("[[security_group]]\nid = \"sg-{i}\"\ningress = [{{ protocol = \"tcp\", ports = \"{}\", from = [\"198.18.0.0/16\"] }}]\n", 1000 + i);
    }
    let groups: Vec<String> = (0..16).map(|i| format!("\"sg-{i}\"")).collect();
    text += &format!(
        "[[interface]]\nid = \"eni-a\"\ngroups = [{}]\n",
        groups.join(", ")
    );
    let s = state(&text);
    let p = plan(&s);
    let remote: IpAddr = "198.18.0.1".parse().unwrap();
    for i in 0..16 {
        assert!(p.lookup(1, IN, remote, 6, 1000 + i).allows(), "group {i}");
    }
    assert!(!p.lookup(1, IN, remote, 6, 1016).allows());
}

#[test]
fn spec_1_9_interfaces_are_enforced_with_their_own_groups() {
    check(
        "per interface",
        r#"
[[security_group]]
id = "sg-a"
ingress = [{ protocol = "tcp", ports = "80", from = ["0.0.0.0/0"] }]
[[security_group]]
id = "sg-b"
ingress = [{ protocol = "tcp", ports = "443", from = ["0.0.0.0/0"] }]
[[interface]]
id = "eni-a"
groups = ["sg-a"]
[[interface]]
id = "eni-b"
groups = ["sg-b"]
"#,
        &[
            ("eni-a", IN, 6, "198.18.0.1", 80, true),
            ("eni-a", IN, 6, "198.18.0.1", 443, false),
            ("eni-b", IN, 6, "198.18.0.1", 443, true),
            ("eni-b", IN, 6, "198.18.0.1", 80, false),
        ],
    );
}

#[test]
fn spec_1_11_untracked_flows_need_any_peer_and_opposite_all() {
    let s = state(
        r#"
[[security_group]]
id = "sg-a"
ingress = [
  { protocol = "tcp", ports = "80", from = ["0.0.0.0/0"] },
  { protocol = "tcp", ports = "22", from = ["198.18.0.0/16"] },
  { protocol = "udp", ports = "53", from = ["0.0.0.0/0"] },
]
egress = [{ protocol = "tcp", ports = "0-65535", to = ["0.0.0.0/0"] }]
[[interface]]
id = "eni-a"
groups = ["sg-a"]
"#,
    );
    let p = plan(&s);
    let flags =
        |remote: &str, proto, port| match p.lookup(1, IN, remote.parse().unwrap(), proto, port) {
            PlanVerdict::Allow(g) => g.flags,
            other => panic!("expected allow, got {other:?}"),
        };
    assert_eq!(
        flags("198.18.0.1", 6, 80) & GRANT_UNTRACKED_TCP,
        GRANT_UNTRACKED_TCP,
        "tcp 80 from 0/0, egress all tcp"
    );
    assert_eq!(
        flags("198.18.0.1", 6, 22) & GRANT_UNTRACKED_TCP,
        0,
        "peer is not 0/0"
    );
    assert_eq!(
        flags("198.18.0.1", 17, 53) & GRANT_UNTRACKED_UDP,
        0,
        "egress does not allow all udp"
    );
}

#[test]
fn identical_rulesets_are_shared() {
    let mut text = String::from(
        "[[security_group]]\nid = \"sg-web\"\n[[security_group]]\nid = \"sg-db\"\ningress = [{ protocol = \"tcp\", ports = \"3306\", from = [\"sg-web\"] }]\n[[interface]]\nid = \"eni-db\"\ngroups = [\"sg-db\"]\n",
    );
    for i in 0..200 {
        text += &format!(
            "[[interface]]\nid = \"eni-{i}\"\nipv4 = [\"198.18.{}.{}\"]\ngroups = [\"sg-web\"]\n",
            i / 200,
            i % 200 + 1
        );
    }
    let s = state(&text);
    let p = compile(
        &s,
        &[LocalInterface {
            ifindex: 7,
            eni: "eni-db".into(),
        }],
        &Options::default(),
        None,
    );
    let ingress: Vec<_> = p
        .prefixes
        .iter()
        .filter(|(k, _)| k.direction == IN)
        .collect();
    assert_eq!(ingress.len(), 200);
    let distinct: std::collections::BTreeSet<u32> = ingress.iter().map(|(_, v)| **v).collect();
    assert_eq!(distinct.len(), 1, "200 members share one ruleset");
}

/// Differential: random states and packets, plan lookup == reference evaluator.
fn differential(seed: u64) {
    let mut rng = Rng::new(seed);
    let s = testgen::state(&mut rng, 3);
    assert!(
        s.validate().is_empty(),
        "seed {seed}: generated state invalid: {:?}",
        s.validate()
    );
    let locals = testgen::locals(&s, 3);
    let p = compile(&s, &locals, &Options::default(), None);
    for _ in 0..40 {
        let local = rng.pick(&locals).clone();
        let pkt = testgen::packet(&mut rng);
        let got = p.lookup(
            local.ifindex,
            pkt.direction,
            pkt.remote,
            pkt.protocol,
            pkt.port,
        );
        let want = evaluate(&s, &local.eni, &pkt, false);
        assert_eq!(
            got.allows(),
            want.allows(),
            "seed {seed}: {pkt:?} on {}: plan {got:?} reference {want:?}",
            local.eni
        );
        if let (PlanVerdict::Allow(g), Verdict::Allow(m)) = (got, &want) {
            let bit = match pkt.protocol {
                6 => GRANT_UNTRACKED_TCP,
                17 => GRANT_UNTRACKED_UDP,
                _ => 0,
            };
            if bit != 0 {
                assert_eq!(
                    g.flags & bit != 0,
                    m.untracked,
                    "seed {seed}: untracked flag for {pkt:?}"
                );
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    #[test]
    fn plan_lookup_equals_reference_evaluator(seed in any::<u64>()) {
        differential(seed);
    }

    #[test]
    fn diff_never_flips_a_verdict_both_plans_agree_on(seed in any::<u64>()) {
        diff_invariant(seed);
    }
}

/// Applies the diff op by op; at every intermediate state, every sampled packet whose
/// verdict both plans agree on gets that verdict. At the end the maps equal the new plan.
fn diff_invariant(seed: u64) {
    let mut rng = Rng::new(seed);
    let old_state = testgen::state(&mut rng, 2);
    let mut new_state = testgen::state(&mut rng, 2);
    if rng.chance(50) {
        // A small edit of the same state is the common case: move one member.
        new_state = old_state.clone();
        if let Some(ni) = new_state.network_interfaces.last_mut() {
            ni.groups.clear();
        }
    }
    let locals = testgen::locals(&old_state, 2);
    let options = Options {
        default_deny: rng.chance(30),
        audit: false,
    };
    let old = compile(&old_state, &locals, &options, None);
    let new = compile(&new_state, &locals, &options, Some(&old));
    let ops = diff(&old, &new);
    let packets: Vec<(u32, Packet)> = (0..60)
        .map(|_| (rng.pick(&locals).ifindex, testgen::packet(&mut rng)))
        .collect();
    let verdict = |p: &Plan, (ifindex, pkt): &(u32, Packet)| {
        p.lookup(*ifindex, pkt.direction, pkt.remote, pkt.protocol, pkt.port)
            .allows()
    };
    // Packets whose verdict both plans agree on, with that verdict.
    let agreed: Vec<(&(u32, Packet), bool)> = packets
        .iter()
        .filter_map(|pkt| {
            let before = verdict(&old, pkt);
            (before == verdict(&new, pkt)).then_some((pkt, before))
        })
        .collect();
    let mut current = old.clone();
    for (step, op) in ops.iter().enumerate() {
        current.apply(op);
        for (pkt, expected) in &agreed {
            assert_eq!(
                verdict(&current, pkt),
                *expected,
                "seed {seed}: step {step} ({op:?}) flips {pkt:?}"
            );
        }
    }
    assert_eq!(
        current.prefixes, new.prefixes,
        "seed {seed}: prefixes after diff"
    );
    assert_eq!(
        current.interfaces, new.interfaces,
        "seed {seed}: interfaces after diff"
    );
    let ports = |p: &Plan| {
        p.rulesets
            .iter()
            .filter(|(_, r)| !r.ports.is_empty())
            .map(|(id, r)| (*id, r.ports.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        ports(&current),
        ports(&new),
        "seed {seed}: port stage after diff"
    );
}

#[test]
fn one_member_change_in_a_10k_group_touches_only_its_entries() {
    let mut text = String::from(
        "[[security_group]]\nid = \"sg-web\"\n[[security_group]]\nid = \"sg-db\"\ningress = [{ protocol = \"tcp\", ports = \"3306\", from = [\"sg-web\"] }, { protocol = \"tcp\", ports = \"22\", from = [\"198.18.0.0/15\"] }]\n[[interface]]\nid = \"eni-db\"\ngroups = [\"sg-db\"]\n",
    );
    for i in 0..10_000u32 {
        text += &format!(
            "[[interface]]\nid = \"eni-{i}\"\nipv4 = [\"198.18.{}.{}\"]\ngroups = [\"sg-web\"]\n",
            i / 250,
            i % 250 + 1
        );
    }
    let s = state(&text);
    let locals = vec![LocalInterface {
        ifindex: 3,
        eni: "eni-db".into(),
    }];
    let old = compile(&s, &locals, &Options::default(), None);
    let mut joined = s.clone();
    joined
        .network_interfaces
        .push(sg_agent::model::NetworkInterface {
            id: "eni-new".into(),
            mac: None,
            ipv4: vec!["198.19.0.1".parse().unwrap()],
            ipv6: vec![],
            groups: vec!["sg-web".into()],
            timeouts: Default::default(),
            audit: false,
            owner_id: None,
        });
    let new = compile(&joined, &locals, &Options::default(), Some(&old));
    let ops = diff(&old, &new);
    assert_eq!(
        ops.len(),
        1,
        "one new member, one new address entry: {ops:?}"
    );
    assert!(matches!(ops[0], MapOp::PutPrefix { .. }));
    let left = compile(&s, &locals, &Options::default(), Some(&new));
    let ops = diff(&new, &left);
    assert_eq!(ops.len(), 1, "member leaves: one deletion: {ops:?}");
    assert!(matches!(ops[0], MapOp::DeletePrefix { .. }));
}

#[test]
fn recompiling_the_same_state_is_an_empty_diff() {
    let s = state(TWO_TIER);
    let a = plan(&s);
    let b = compile(&s, &locals(&s), &Options::default(), Some(&a));
    assert!(diff(&a, &b).is_empty());
}
