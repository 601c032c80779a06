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
    let frame_len = tcp("198.18.11.5", ME4, 1000, 22, TH_SYN).build().len() as u32;
    let denied: Vec<_> = drain_events(&mut bpf)
        .into_iter()
        .filter(|e| !e.admitted)
        .collect();
    assert!(
        (1..=200).contains(&denied.len()),
        "denied events are rate-limited: {} of 300",
        denied.len()
    );
    let d = &denied[0];
    assert_eq!(
        (d.reason, d.bytes, d.tcp_flags, d.audited, d.rule_id),
        (sg_common::drop_reason::POLICY, frame_len, TH_SYN, false, 0),
        "{d:?}"
    );
    // Those the rate limit left out are counted, with their bytes (flow logs: SKIPDATA).
    let c = bpf.dp.tables().counters(LO).expect("counters");
    let at = sg_common::Counters::index(
        sg_common::DIR_INGRESS,
        sg_common::counter::EVENTS_SUPPRESSED,
    );
    assert_eq!(c.v[at], 300 - denied.len() as u64);
    assert_eq!(c.bytes[at], c.v[at] * frame_len as u64);
    let dropped = sg_common::Counters::index(
        sg_common::DIR_INGRESS,
        sg_common::counter::drop_slot(sg_common::drop_reason::POLICY),
    );
    assert_eq!(
        (c.v[dropped], c.bytes[dropped]),
        (300, 300 * frame_len as u64)
    );
}

#[test]
fn audit_mode_passes_what_it_would_deny_and_says_so() {
    if !require_root("audit_mode_passes_what_it_would_deny_and_says_so") {
        return;
    }
    let mut bpf = main_bpf();
    let _ = drain_events(&mut bpf);
    let denied = tcp("198.18.11.5", ME4, 1000, 22, TH_SYN).build();
    for hook in [Hook::Xdp, Hook::TcIngress] {
        assert!(!bpf.run(hook, &denied), "{hook:?}: denied without audit");
    }
    let state = sg_tests::fixtures::state(sg_tests::fixtures::STATE);
    let locals = [sg_agent::compile::LocalInterface {
        ifindex: LO,
        eni: "eni-main".into(),
    }];
    bpf.program(
        &state,
        &locals,
        &sg_agent::compile::Options {
            audit: true,
            ..Default::default()
        },
    );
    let _ = drain_events(&mut bpf);
    for hook in [Hook::Xdp, Hook::TcIngress] {
        assert!(bpf.run(hook, &denied), "{hook:?}: audit passes it");
    }
    let events = drain_events(&mut bpf);
    assert_eq!(events.len(), 2, "{events:?}");
    assert!(events
        .iter()
        .all(|e| e.audited && !e.admitted && e.reason == sg_common::drop_reason::POLICY));
    let c = bpf.dp.tables().counters(LO).expect("counters");
    let at = |slot| sg_common::Counters::index(sg_common::DIR_INGRESS, slot);
    assert_eq!(c.v[at(sg_common::counter::AUDIT_PASSED)], 2);
    // Audit off again: dropped.
    bpf.program(&state, &locals, &sg_agent::compile::Options::default());
    assert!(!bpf.run(Hook::Xdp, &denied));
}
