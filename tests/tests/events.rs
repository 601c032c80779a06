//! What the kernel programs report: per-rule hits and flow events (admitted flows,
//! rate-limited denials), read as the agent reads them.

use sg_agent::{events, model::Direction};
use sg_tests::{
    bpf::{Bpf, Hook, LO},
    fixtures::{main_bpf, ME4},
    packet::{tcp, TH_ACK, TH_SYN},
    privileges::require_root,
};

/// Every event in the ring, decoded as the agent decodes them.
fn drain_events(bpf: &mut Bpf) -> Vec<events::Event> {
    let map = bpf
        .dp
        .ebpf()
        .map_mut(sg_common::MAP_EVENTS)
        .expect("SG_EVENTS");
    let mut ring = aya::maps::RingBuf::try_from(map).expect("ring buffer");
    let mut out = vec![];
    while let Some(item) = ring.next() {
        out.push(events::decode(&item).expect("a whole flow event"));
    }
    out
}

fn rule_hits(bpf: &mut Bpf, rule_id: u32) -> u64 {
    let hits = bpf.dp.tables().rule_hits().expect("reading SG_RULE_HITS");
    hits.get(&rule_id).copied().unwrap_or(0)
}

#[test]
fn rule_hits_and_flow_events() {
    if !require_root("rule_hits_and_flow_events") {
        return;
    }
    let mut bpf = main_bpf();
    let _ = drain_events(&mut bpf);
    let remote: std::net::IpAddr = "198.18.10.5".parse().unwrap();
    let grant = match bpf.plan.lookup(LO, Direction::Ingress, remote, 6, 22) {
        sg_agent::compile::PlanVerdict::Allow(g) => g,
        other => panic!("the plan must allow tcp 22 from {remote}: {other:?}"),
    };
    assert_eq!(rule_hits(&mut bpf, grant.rule_id), 0);
    for (hook, port) in [(Hook::Xdp, 40000), (Hook::TcIngress, 40001)] {
        assert!(bpf.run(hook, &tcp("198.18.10.5", ME4, port, 22, TH_SYN).build()));
        // A tracked packet of the same flow is not a new admission.
        assert!(bpf.run(hook, &tcp("198.18.10.5", ME4, port, 22, TH_ACK).build()));
    }
    assert_eq!(
        rule_hits(&mut bpf, grant.rule_id),
        2,
        "one hit per admitted flow"
    );
    let events = drain_events(&mut bpf);
    let admitted: Vec<_> = events.iter().filter(|e| e.admitted).collect();
    assert_eq!(admitted.len(), 2, "{events:?}");
    let e = admitted[0];
    assert_eq!(
        (e.rule_id, e.direction, e.protocol),
        (grant.rule_id, Direction::Ingress, 6)
    );
    assert_eq!((e.local_port, e.remote_port), (22, 40000));
    assert_eq!(e.remote, remote);
    assert_eq!(e.ifindex, LO);
    // Denied packets produce rate-limited events (100 per second per CPU by default).
    for i in 0..300u16 {
        assert!(!bpf.run(
            Hook::Xdp,
            &tcp("198.18.11.5", ME4, 1000 + i, 22, TH_SYN).build()
        ));
    }
    let denied = drain_events(&mut bpf)
        .into_iter()
        .filter(|e| !e.admitted)
        .count();
    assert!(
        (1..=200).contains(&denied),
        "denied events are rate-limited: {denied} of 300"
    );
}
