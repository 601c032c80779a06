//! Conntrack as strict as netfilter (SPEC §1.3, §1.4, §1.11, §1.12), through the real
//! programs on both ingress hooks: only ICMP queries are tracked, related errors must
//! go to the quoted packet's sender, only a SYN opens a TCP flow and invalid flags are
//! dropped, only assured flows reach the protected table, untracked flows' replies open
//! nothing, and losses of events and rule hits are counted. Each case failed on the main
//! branch before this file.

use sg_agent::{compile::LocalInterface, datapath::MapSizes};
use sg_common::{counter, drop_reason, DIR_EGRESS, DIR_INGRESS};
use sg_tests::{
    bpf::{Bpf, Hook, Outcome, LO},
    fixtures::{main_bpf, sizes, state, ME4, ME6},
    packet::{icmp, icmp_error, tcp, udp, TH_ACK, TH_FIN, TH_RST, TH_SYN},
    privileges::require_root,
};

const EG: Hook = Hook::TcEgress;

/// (in the established table, in the embryonic table) counts of flows.
fn tables(bpf: &mut Bpf) -> (usize, usize) {
    let flows = bpf.dp.tables().flows().expect("flows");
    let established = flows.iter().filter(|f| f.2).count();
    (established, flows.len() - established)
}

#[test]
fn only_icmp_queries_open_and_match_flows() {
    if !require_root("only_icmp_queries_open_and_match_flows") {
        return;
    }
    for ingress in Hook::INGRESS {
        let mut bpf = main_bpf();
        // The state allows timestamp requests (13/0) from 198.18.0.0/16, and no type 5.
        bpf.sequence(
            &format!("{ingress:?}: timestamp query"),
            &[
                (ingress, icmp("198.18.1.1", ME4, 13, 0, 7), true),
                (EG, icmp(ME4, "198.18.1.1", 14, 0, 7), true),
                // Redirects, router advertisements and unrelated errors from the same peer
                // never ride the query's flow: the rules judge them, and none allows them.
                (ingress, icmp("198.18.1.1", ME4, 5, 1, 0), false),
                (ingress, icmp("198.18.1.1", ME4, 9, 0, 0), false),
                (ingress, icmp("198.18.1.1", ME4, 3, 3, 0), false),
                // A reply of another pair with the same identifier is not this flow's.
                (ingress, icmp("198.18.1.1", ME4, 0, 0, 7), false),
                // A reply we never asked for.
                (ingress, icmp("198.18.1.1", ME4, 14, 0, 8), false),
                // Outbound, a non-query type to the peer opens nothing and is judged by the
                // egress rules (icmp 8 only).
                (EG, icmp(ME4, "198.18.1.1", 5, 1, 0), false),
            ],
        );
        let icmp_flows = bpf
            .dp
            .tables()
            .flows()
            .unwrap()
            .into_iter()
            .filter(|f| f.0.protocol == 1)
            .count();
        assert_eq!(icmp_flows, 1, "{ingress:?}: one flow, the query's");
    }
}

#[test]
fn related_icmp_errors_go_to_the_quoted_sender_of_a_live_flow() {
    if !require_root("related_icmp_errors_go_to_the_quoted_sender_of_a_live_flow") {
        return;
    }
    for ingress in Hook::INGRESS {
        let mut bpf = main_bpf();
        // An inbound SSH flow from the admin range.
        let syn = tcp("198.18.10.5", ME4, 40000, 22, TH_SYN);
        assert!(bpf.run(ingress, &syn.build()));
        let reply = tcp(ME4, "198.18.10.5", 22, 40000, TH_SYN | TH_ACK);
        // An error about our reply, from a router to us: related.
        let good = icmp_error("198.19.9.9", ME4, 3, 4, &reply);
        assert!(
            bpf.run(ingress, &good.build()),
            "{ingress:?}: error to the sender"
        );
        // Outbound, an error quoting the inbound flow must go to its sender; one addressed
        // elsewhere (a way out past egress policy) is judged by the egress rules.
        let out_ok = icmp_error(ME4, "198.18.10.5", 3, 3, &syn);
        assert!(
            bpf.run(EG, &out_ok.build()),
            "{ingress:?}: error to the quoted sender"
        );
        let mut out_bad = icmp_error(ME4, "198.19.200.1", 3, 3, &syn);
        out_bad.payload = 1200;
        assert!(
            !bpf.run(EG, &out_bad.build()),
            "{ingress:?}: error to another address"
        );
        // An error addressed to another local address.
        let elsewhere = icmp_error("198.19.9.9", "198.18.0.99", 3, 4, &reply);
        assert!(
            !bpf.run(ingress, &elsewhere.build()),
            "{ingress:?}: to another address"
        );
        // Once the flow expired, its errors are not related any more.
        bpf.advance_clock(200);
        assert!(
            !bpf.run(ingress, &good.build()),
            "{ingress:?}: an expired flow"
        );
    }
}

#[test]
fn only_a_syn_opens_a_tcp_flow_and_invalid_flags_are_dropped() {
    if !require_root("only_a_syn_opens_a_tcp_flow_and_invalid_flags_are_dropped") {
        return;
    }
    for ingress in Hook::INGRESS {
        let mut bpf = main_bpf();
        // Port 22 from 198.18.10.0/24 is allowed: first packets that are not a SYN pass by
        // the rule, packet by packet, and open nothing.
        for (what, flags) in [
            ("syn-ack", TH_SYN | TH_ACK),
            ("fin-ack", TH_FIN | TH_ACK),
            ("bare ack", TH_ACK),
            ("rst", TH_RST),
        ] {
            let f = tcp("198.18.10.5", ME4, 41000, 22, flags).build();
            assert!(
                bpf.run(ingress, &f),
                "{ingress:?}: {what} allowed by the rule"
            );
            assert_eq!(
                tables(&mut bpf),
                (0, 0),
                "{ingress:?}: {what} opened a flow"
            );
        }
        for (what, flags) in [
            ("no flags", 0),
            ("syn-fin", TH_SYN | TH_FIN),
            ("syn-rst", TH_SYN | TH_RST),
            ("fin alone", TH_FIN),
            ("christmas tree", 0x3f),
        ] {
            let f = tcp("198.18.10.5", ME4, 41001, 22, flags).build();
            assert_eq!(
                bpf.outcome(ingress, &f).unwrap(),
                Outcome::Drop(drop_reason::INVALID_TCP_FLAGS),
                "{ingress:?}: {what}"
            );
        }
        assert_eq!(tables(&mut bpf), (0, 0));
        // A reply-direction bare ACK does not answer a SYN.
        assert!(bpf.run(ingress, &tcp("198.18.10.5", ME4, 41002, 22, TH_SYN).build()));
        assert!(bpf.run(EG, &tcp(ME4, "198.18.10.5", 22, 41002, TH_ACK).build()));
        let flows = bpf.dp.tables().flows().unwrap();
        assert_eq!(flows.len(), 1);
        assert_eq!(
            flows[0].1.tcp_state,
            sg_common::ct::TCP_SYN_SENT,
            "{ingress:?}"
        );
    }
}

#[test]
fn only_assured_flows_reach_the_protected_table() {
    if !require_root("only_assured_flows_reach_the_protected_table") {
        return;
    }
    for ingress in Hook::INGRESS {
        let mut bpf = main_bpf();
        // A refused connection: SYN answered by RST.
        assert!(bpf.run(ingress, &tcp("198.18.10.5", ME4, 42000, 22, TH_SYN).build()));
        assert!(bpf.run(
            EG,
            &tcp(ME4, "198.18.10.5", 22, 42000, TH_RST | TH_ACK)
                .seq(0, 2)
                .build()
        ));
        assert_eq!(
            tables(&mut bpf).0,
            0,
            "{ingress:?}: a refused SYN is not assured"
        );
        // One ping exchange.
        assert!(bpf.run(ingress, &icmp("198.18.1.1", ME4, 8, 0, 9).build()));
        assert!(bpf.run(EG, &icmp(ME4, "198.18.1.1", 0, 0, 9).build()));
        assert_eq!(tables(&mut bpf).0, 0, "{ingress:?}: a ping is not assured");
        // One UDP request and its reply.
        assert!(bpf.run(ingress, &udp("198.18.1.1", ME4, 5353, 5001).build()));
        assert!(bpf.run(EG, &udp(ME4, "198.18.1.1", 5001, 5353).build()));
        assert_eq!(
            tables(&mut bpf).0,
            0,
            "{ingress:?}: one UDP exchange is not assured"
        );
        // A UDP stream is, and so is a complete handshake.
        assert!(bpf.run(ingress, &udp("198.18.1.1", ME4, 5353, 5001).build()));
        assert_eq!(
            tables(&mut bpf).0,
            1,
            "{ingress:?}: a UDP stream is assured"
        );
        assert!(bpf.run(ingress, &tcp("198.18.10.5", ME4, 42001, 22, TH_SYN).build()));
        assert!(bpf.run(
            EG,
            &tcp(ME4, "198.18.10.5", 22, 42001, TH_SYN | TH_ACK).build()
        ));
        assert_eq!(
            tables(&mut bpf).0,
            1,
            "{ingress:?}: half open is not assured"
        );
        assert!(bpf.run(ingress, &tcp("198.18.10.5", ME4, 42001, 22, TH_ACK).build()));
        assert_eq!(tables(&mut bpf).0, 2, "{ingress:?}: a handshake is assured");
    }
}

/// Ingress TCP 80 and UDP 53 from anywhere, egress everything to anywhere: both are
/// untracked (SPEC §1.11).
const UNTRACKED: &str = r#"
[[security_group]]
id = "sg-u"
ingress = [
  { protocol = "tcp", ports = "80", from = ["0.0.0.0/0", "::/0"] },
  { protocol = "udp", ports = "53", from = ["0.0.0.0/0", "::/0"] },
]

[[interface]]
id = "eni-u"
ipv4 = ["198.18.0.1"]
ipv6 = ["2001:db8:1::1"]
groups = ["sg-u"]
"#;

#[test]
fn replies_of_untracked_flows_open_nothing() {
    if !require_root("replies_of_untracked_flows_open_nothing") {
        return;
    }
    for ingress in Hook::INGRESS {
        let mut bpf = Bpf::with_state(
            &state(UNTRACKED),
            &[LocalInterface {
                ifindex: LO,
                eni: "eni-u".into(),
            }],
            &sizes(),
        );
        for (v4, me, peer) in [(true, ME4, "198.19.5.5"), (false, ME6, "2001:db8:9::5")] {
            bpf.sequence(
                &format!("{ingress:?} v4={v4}"),
                &[
                    (ingress, tcp(peer, me, 43000, 80, TH_SYN), true),
                    (EG, tcp(me, peer, 80, 43000, TH_SYN | TH_ACK), true),
                    (ingress, tcp(peer, me, 43000, 80, TH_ACK), true),
                    (ingress, udp(peer, me, 43001, 53), true),
                    (EG, udp(me, peer, 53, 43001), true),
                ],
            );
            assert_eq!(
                tables(&mut bpf),
                (0, 0),
                "{ingress:?}: replies of untracked flows opened flows"
            );
        }
        // An outbound UDP request that no untracked rule answers is tracked as ever.
        assert!(bpf.run(EG, &udp(ME4, "198.19.5.5", 43002, 9999).build()));
        assert_eq!(tables(&mut bpf), (0, 1));
    }
}

#[test]
fn lost_events_and_rule_hits_are_counted() {
    if !require_root("lost_events_and_rule_hits_are_counted") {
        return;
    }
    // A hit map of one entry: every rule id (from 1) lies beyond it.
    let tiny = MapSizes {
        rules: 1,
        conntrack_new: 1 << 16,
        ..sizes()
    };
    let mut bpf = Bpf::with_state(
        &state(sg_tests::fixtures::STATE),
        &[LocalInterface {
            ifindex: LO,
            eni: "eni-main".into(),
        }],
        &tiny,
    );
    assert!(bpf.run(
        Hook::Xdp,
        &tcp("198.18.10.5", ME4, 44000, 22, TH_SYN).build()
    ));
    assert!(bpf.counter(LO, DIR_INGRESS, counter::RULE_HITS_LOST) >= 1);
    // Admitted flows until the ring (1 MiB, never drained here) is full.
    let before = bpf.counter(LO, DIR_INGRESS, counter::EVENTS_LOST);
    for i in 0..20_000u32 {
        let src = format!("198.18.{}.{}", 20 + i / 250, 1 + i % 250);
        assert!(bpf.run(Hook::Xdp, &tcp(&src, ME4, 44001, 1500, TH_SYN).build()));
    }
    let lost = bpf.counter(LO, DIR_INGRESS, counter::EVENTS_LOST) - before;
    assert!(lost > 0, "a full ring's losses are counted");
    let _ = DIR_EGRESS;
}

/// The TCP state and table (established or not) of the flow whose local port is `port`.
fn tcp_flow(bpf: &mut Bpf, port: u16) -> (u8, bool) {
    let flows = bpf.dp.tables().flows().expect("flows");
    let f = flows
        .iter()
        .find(|(k, _, _)| k.protocol == 6 && u16::from_be_bytes(k.local_port) == port)
        .unwrap_or_else(|| panic!("no TCP flow on local port {port}: {flows:?}"));
    (f.1.tcp_state, f.2)
}

#[test]
fn rst_and_fin_change_a_flow_only_with_a_plausible_sequence_number() {
    if !require_root("rst_and_fin_change_a_flow_only_with_a_plausible_sequence_number") {
        return;
    }
    use sg_common::ct::{TCP_CLOSE, TCP_ESTABLISHED, TCP_FIN_WAIT, TCP_SYN_SENT};
    for ingress in Hook::INGRESS {
        let mut bpf = main_bpf();
        // 198.18.10.5 connects to port 22: its ISN 1000, ours 5000; it sends 100 bytes.
        let peer =
            |flags: u8, seq: u32, ack: u32| tcp("198.18.10.5", ME4, 43000, 22, flags).seq(seq, ack);
        let me =
            |flags: u8, seq: u32, ack: u32| tcp(ME4, "198.18.10.5", 22, 43000, flags).seq(seq, ack);
        let mut data = peer(TH_ACK, 1001, 5001);
        data.payload = 100;
        bpf.sequence(
            &format!("{ingress:?}: handshake and data"),
            &[
                (ingress, peer(TH_SYN, 1000, 0), true),
                (EG, me(TH_SYN | TH_ACK, 5000, 1001), true),
                (ingress, peer(TH_ACK, 1001, 5001), true),
                (ingress, data, true),
                (EG, me(TH_ACK, 5001, 1101), true),
            ],
        );
        assert_eq!(tcp_flow(&mut bpf, 22), (TCP_ESTABLISHED, true));
        // Blind RSTs, both ways: out of the window, dropped; the flow does not change.
        for (hook, f) in [
            (ingress, peer(TH_RST, 0, 0)),
            (ingress, peer(TH_RST, 1101 + 70_000, 0)),
            (ingress, peer(TH_RST | TH_ACK, 0x8000_0000, 5001)),
            (ingress, peer(TH_RST, 900, 0)),
            (EG, me(TH_RST, 9_999_999, 0)),
        ] {
            assert_eq!(
                bpf.outcome(hook, &f.build()).unwrap(),
                Outcome::Drop(drop_reason::TCP_OUT_OF_WINDOW),
                "{ingress:?}: {f:?}"
            );
            assert_eq!(tcp_flow(&mut bpf, 22), (TCP_ESTABLISHED, true), "{f:?}");
        }
        // A blind FIN passes (a retransmitted FIN may be old) but closes nothing.
        assert!(bpf.run(ingress, &peer(TH_FIN | TH_ACK, 0x4000_0000, 5001).build()));
        assert_eq!(tcp_flow(&mut bpf, 22), (TCP_ESTABLISHED, true));
        // A forged ACK acknowledging what we never sent moves nothing either: our RST at
        // our next sequence number is still in the window the peer last advertised.
        assert!(bpf.run(ingress, &peer(TH_ACK, 1101, 0x7000_0000).build()));
        // The real FIN, at the peer's next sequence number, closes.
        assert!(bpf.run(ingress, &peer(TH_FIN | TH_ACK, 1101, 5001).build()));
        assert_eq!(tcp_flow(&mut bpf, 22).0, TCP_FIN_WAIT);
        // And a RST in the window ends the flow.
        assert!(bpf.run(EG, &me(TH_RST, 5001, 0).build()));
        assert_eq!(tcp_flow(&mut bpf, 22).0, TCP_CLOSE);

        // A SYN we sent is answered only by a RST that acknowledges it (RFC 793).
        let out = tcp(ME4, "198.19.1.1", 44000, 443, TH_SYN).seq(7000, 0);
        assert!(bpf.run(EG, &out.build()));
        let answer = |ack: u32| {
            tcp("198.19.1.1", ME4, 443, 44000, TH_RST | TH_ACK)
                .seq(0, ack)
                .build()
        };
        for ack in [0, 7000, 7002, 12345] {
            assert_eq!(
                bpf.outcome(ingress, &answer(ack)).unwrap(),
                Outcome::Drop(drop_reason::TCP_OUT_OF_WINDOW),
                "{ingress:?}: RST acknowledging {ack}"
            );
            assert_eq!(tcp_flow(&mut bpf, 44000).0, TCP_SYN_SENT);
        }
        assert!(bpf.run(ingress, &answer(7001)));
        assert_eq!(tcp_flow(&mut bpf, 44000).0, TCP_CLOSE);
        assert_eq!(
            bpf.counter(
                LO,
                DIR_INGRESS,
                counter::drop_slot(drop_reason::TCP_OUT_OF_WINDOW)
            ),
            8,
            "{ingress:?}: every blind RST from the peer counted"
        );
    }
}

#[test]
fn expired_flows_never_block_new_ones_even_without_the_agent() {
    if !require_root("expired_flows_never_block_new_ones_even_without_the_agent") {
        return;
    }
    use sg_common::ct::TCP_ESTABLISHED;
    for ingress in Hook::INGRESS {
        // An established table of 16 flows, and no agent: nothing but the datapath runs.
        let small = MapSizes {
            conntrack: 16,
            conntrack_new: 256,
            ..sizes()
        };
        let mut bpf = Bpf::with_state(
            &state(sg_tests::fixtures::STATE),
            &[LocalInterface {
                ifindex: LO,
                eni: "eni-main".into(),
            }],
            &small,
        );
        let establish = |bpf: &mut Bpf, port: u16| {
            let out = |flags: u8, seq: u32, ack: u32| {
                tcp(ME4, "198.19.1.1", port, 443, flags)
                    .seq(seq, ack)
                    .build()
            };
            bpf.run(EG, &out(TH_SYN, 100, 0))
                && bpf.run(
                    ingress,
                    &tcp("198.19.1.1", ME4, 443, port, TH_SYN | TH_ACK)
                        .seq(900, 101)
                        .build(),
                )
                && bpf.run(EG, &out(TH_ACK, 101, 901))
        };
        // Fill it: every slot of the established table holds a live flow.
        let mut port = 31000;
        while tables(&mut bpf).0 < 16 {
            assert!(port < 31200, "{ingress:?}: the table fills");
            establish(&mut bpf, port);
            port += 1;
        }
        // Full of live flows: a new handshake cannot be protected (AWS's
        // conntrack_allowance_exceeded), and the live flows stay.
        let before = bpf.counter(
            LO,
            DIR_EGRESS,
            counter::drop_slot(drop_reason::CONNTRACK_FULL),
        );
        establish(&mut bpf, 32000);
        let after = bpf.counter(
            LO,
            DIR_EGRESS,
            counter::drop_slot(drop_reason::CONNTRACK_FULL),
        );
        let protected = tables(&mut bpf).0;
        assert_eq!(protected, 16, "{ingress:?}: live flows are never evicted");
        assert!(
            after > before || tcp_flow(&mut bpf, 32000) != (TCP_ESTABLISHED, true),
            "{ingress:?}: no room for a 17th protected flow"
        );
        // Six days later every flow has expired (5 days): new handshakes complete and are
        // protected, with no agent to collect the dead ones.
        bpf.advance_clock(6 * 86_400);
        for p in 33000..33016u16 {
            assert!(establish(&mut bpf, p), "{ingress:?}: handshake {p}");
            assert_eq!(
                tcp_flow(&mut bpf, p),
                (TCP_ESTABLISHED, true),
                "{ingress:?}: flow {p} protected"
            );
        }
    }
}

#[test]
fn arp_passes_and_is_counted_as_infrastructure() {
    if !require_root("arp_passes_and_is_counted_as_infrastructure") {
        return;
    }
    for hook in [Hook::Xdp, Hook::TcIngress, EG] {
        let mut bpf = main_bpf();
        assert!(bpf.run(hook, &sg_tests::packet::arp()));
        let dir = if hook == EG { DIR_EGRESS } else { DIR_INGRESS };
        assert_eq!(bpf.counter(LO, dir, counter::INFRASTRUCTURE), 1, "{hook:?}");
    }
}

#[test]
fn icmpv6_errors_quoting_extension_headers_find_their_flow() {
    if !require_root("icmpv6_errors_quoting_extension_headers_find_their_flow") {
        return;
    }
    for ingress in Hook::INGRESS {
        let mut bpf = main_bpf();
        // A DNS query out (egress allows UDP 53 to 2001:db8::/32): a tracked flow. Its
        // datagram was fragmented, with destination options before the fragment header.
        let mut about = udp(ME6, "2001:db8:2::7", 40000, 53);
        about.payload = 200;
        assert!(bpf.run(EG, &about.build()));
        about.ipv6_ext = vec![60];
        about.fragment = Some((9, 0, true));
        // A router's "packet too big" about it (ICMPv6 type 2): no rule admits it, only
        // the flow it quotes, found past the quoted extension headers (SPEC §1.4).
        let too_big = icmp_error("2001:db8:9::1", ME6, 2, 0, &about);
        assert!(
            bpf.run(ingress, &too_big.build()),
            "{ingress:?}: packet too big quoting a fragment header"
        );
        // The same error quoting a later fragment names no flow: judged by the rules.
        about.fragment = Some((9, 1232, false));
        let later = icmp_error("2001:db8:9::1", ME6, 2, 0, &about);
        assert_eq!(
            bpf.outcome(ingress, &later.build()).unwrap(),
            Outcome::Drop(drop_reason::POLICY),
            "{ingress:?}"
        );
        // Nor does one quoting a flow that does not exist.
        let mut other = udp(ME6, "2001:db8:2::7", 40001, 53);
        other.ipv6_ext = vec![0, 60];
        let unrelated = icmp_error("2001:db8:9::1", ME6, 2, 0, &other);
        assert!(!bpf.run(ingress, &unrelated.build()), "{ingress:?}");
        // Nor one addressed to another host than the quoted packet's sender.
        about.fragment = Some((9, 0, true));
        let misaddressed = icmp_error("2001:db8:9::1", "2001:db8:1::2", 2, 0, &about);
        assert!(!bpf.run(ingress, &misaddressed.build()), "{ingress:?}");
    }
}
