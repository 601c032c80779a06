//! Connection tracking in the kernel programs (BPF_PROG_TEST_RUN): stateful sequences,
//! related ICMP errors, untracked flows, TCP and other timeouts, capacity, interfaces and
//! membership changes.

use sg_agent::{
    compile::{LocalInterface, Options},
    datapath::MapSizes,
};
use sg_common::{counter, ct, drop_reason, DIR_EGRESS, DIR_INGRESS};
use sg_tests::fixtures::{main_bpf, sizes, state, ME4, ME6, STATE};
use sg_tests::{
    bpf::{Bpf, Hook, LO},
    netns::Netns,
    packet::{icmp, icmp_error, tcp, udp, Spec, L4, TH_ACK, TH_FIN, TH_RST, TH_SYN},
    privileges::require_root,
};

#[test]
fn stateful_sequences_in_both_orders() {
    if !require_root("stateful_sequences_in_both_orders") {
        return;
    }
    for ingress in Hook::INGRESS {
        let mut bpf = main_bpf();
        let eg = Hook::TcEgress;
        bpf.sequence(
            "egress-opened tcp",
            &[
                (eg, tcp(ME4, "198.19.1.1", 40001, 443, TH_SYN), true),
                (
                    ingress,
                    tcp("198.19.1.1", ME4, 443, 40001, TH_SYN | TH_ACK),
                    true,
                ),
                (eg, tcp(ME4, "198.19.1.1", 40001, 443, TH_ACK), true),
                (ingress, tcp("198.19.1.1", ME4, 443, 40001, TH_ACK), true),
                (ingress, tcp("198.19.1.1", ME4, 443, 40002, TH_ACK), false),
                (ingress, tcp("198.19.1.2", ME4, 443, 40001, TH_ACK), false),
            ],
        );
        bpf.sequence(
            "ingress-opened tcp",
            &[
                (ingress, tcp("198.18.10.5", ME4, 50000, 22, TH_SYN), true),
                (
                    eg,
                    tcp(ME4, "198.18.10.5", 22, 50000, TH_SYN | TH_ACK),
                    true,
                ),
                (ingress, tcp("198.18.10.5", ME4, 50000, 22, TH_ACK), true),
                (eg, tcp(ME4, "198.18.10.5", 22, 50000, TH_ACK), true),
                (eg, tcp(ME4, "198.18.10.5", 22, 50001, TH_ACK), false),
                (eg, tcp(ME4, "198.18.10.5", 40000, 22, TH_SYN), false),
            ],
        );
        bpf.sequence(
            "egress-opened tcp6",
            &[
                (eg, tcp(ME6, "2001:db8:2::1", 40001, 443, TH_SYN), true),
                (
                    ingress,
                    tcp("2001:db8:2::1", ME6, 443, 40001, TH_SYN | TH_ACK),
                    true,
                ),
                (
                    ingress,
                    tcp("2001:db8:2::1", ME6, 443, 40009, TH_SYN | TH_ACK),
                    false,
                ),
            ],
        );
        bpf.sequence(
            "ingress-opened tcp6",
            &[
                (
                    ingress,
                    tcp("2001:db8:1:10::5", ME6, 50000, 22, TH_SYN),
                    true,
                ),
                (
                    eg,
                    tcp(ME6, "2001:db8:1:10::5", 22, 50000, TH_SYN | TH_ACK),
                    true,
                ),
                (
                    eg,
                    tcp(ME6, "2001:db8:1:10::6", 22, 50000, TH_SYN | TH_ACK),
                    false,
                ),
            ],
        );
        bpf.sequence(
            "udp",
            &[
                (eg, udp(ME4, "198.19.1.1", 40000, 53), true),
                (ingress, udp("198.19.1.1", ME4, 53, 40000), true),
                (ingress, udp("198.19.1.1", ME4, 54, 40000), false),
                (ingress, udp("198.18.1.1", ME4, 40000, 5001), true),
                (eg, udp(ME4, "198.18.1.1", 5001, 40000), true),
                (eg, udp(ME4, "198.18.1.1", 5002, 40000), false),
            ],
        );
        bpf.sequence(
            "udp6",
            &[
                (eg, udp(ME6, "2001:db8:2::1", 40000, 53), true),
                (ingress, udp("2001:db8:2::1", ME6, 53, 40000), true),
                (ingress, udp("2001:db8:2::1", ME6, 53, 40001), false),
            ],
        );
        bpf.sequence(
            "icmp echo by identifier and type",
            &[
                (eg, icmp(ME4, "198.19.1.1", 8, 0, 77), true),
                (ingress, icmp("198.19.1.1", ME4, 0, 0, 77), true),
                (ingress, icmp("198.19.1.1", ME4, 0, 0, 78), false),
                (ingress, icmp("198.19.1.1", ME4, 8, 0, 77), false),
                (ingress, icmp("198.18.1.1", ME4, 8, 0, 99), true),
                (eg, icmp(ME4, "198.18.1.1", 0, 0, 99), true),
                (eg, icmp(ME4, "198.18.1.1", 0, 0, 98), false),
            ],
        );
        bpf.sequence(
            "icmpv6 echo",
            &[
                (eg, icmp(ME6, "2001:db8:2::1", 128, 0, 77), true),
                (ingress, icmp("2001:db8:2::1", ME6, 129, 0, 77), true),
                (ingress, icmp("2001:db8:2::1", ME6, 128, 0, 77), false),
            ],
        );
        bpf.sequence(
            "other protocol by address pair",
            &[
                (
                    eg,
                    Spec::new(
                        ME4,
                        "198.19.1.1",
                        L4::Other {
                            protocol: 47,
                            len: 8,
                        },
                    ),
                    true,
                ),
                (
                    ingress,
                    Spec::new(
                        "198.19.1.1",
                        ME4,
                        L4::Other {
                            protocol: 47,
                            len: 8,
                        },
                    ),
                    true,
                ),
                (
                    ingress,
                    Spec::new(
                        "198.19.1.2",
                        ME4,
                        L4::Other {
                            protocol: 47,
                            len: 8,
                        },
                    ),
                    false,
                ),
                (
                    ingress,
                    Spec::new(
                        "198.19.1.1",
                        ME4,
                        L4::Other {
                            protocol: 94,
                            len: 8,
                        },
                    ),
                    false,
                ),
                (
                    eg,
                    Spec::new(
                        ME6,
                        "2001:db8:2::1",
                        L4::Other {
                            protocol: 47,
                            len: 8,
                        },
                    ),
                    true,
                ),
                (
                    ingress,
                    Spec::new(
                        "2001:db8:2::1",
                        ME6,
                        L4::Other {
                            protocol: 47,
                            len: 8,
                        },
                    ),
                    true,
                ),
            ],
        );
    }
}

#[test]
fn related_icmp_errors_follow_their_flow() {
    if !require_root("related_icmp_errors_follow_their_flow") {
        return;
    }
    for ingress in Hook::INGRESS {
        let mut bpf = main_bpf();
        let out = tcp(ME4, "198.19.1.1", 40001, 443, TH_SYN);
        assert!(bpf.run(Hook::TcEgress, &out.build()));
        let frag_needed = icmp_error("198.19.0.254", ME4, 3, 4, &out);
        assert!(
            bpf.run(ingress, &frag_needed.build()),
            "{ingress:?}: frag-needed for a tracked flow"
        );
        let ttl = icmp_error("198.19.0.254", ME4, 11, 0, &out);
        assert!(
            bpf.run(ingress, &ttl.build()),
            "{ingress:?}: time exceeded for a tracked flow"
        );
        let unknown = tcp(ME4, "198.19.1.1", 40009, 443, TH_SYN);
        let stray = icmp_error("198.19.0.254", ME4, 3, 4, &unknown);
        assert!(
            !bpf.run(ingress, &stray.build()),
            "{ingress:?}: frag-needed for an unknown flow"
        );

        let out6 = tcp(ME6, "2001:db8:2::1", 40001, 443, TH_SYN);
        assert!(bpf.run(Hook::TcEgress, &out6.build()));
        let too_big = icmp_error("2001:db8:2::fe", ME6, 2, 0, &out6);
        assert!(
            bpf.run(ingress, &too_big.build()),
            "{ingress:?}: packet-too-big for a tracked flow"
        );
        let unknown6 = tcp(ME6, "2001:db8:2::1", 40009, 443, TH_SYN);
        assert!(
            !bpf.run(
                ingress,
                &icmp_error("2001:db8:2::fe", ME6, 2, 0, &unknown6).build()
            ),
            "{ingress:?}: packet-too-big, unknown flow"
        );
        // An error about an ingress-opened flow, sent by us on egress.
        let inbound = udp("198.18.1.1", ME4, 40000, 5001);
        assert!(bpf.run(ingress, &inbound.build()));
        assert!(
            bpf.run(
                Hook::TcEgress,
                &icmp_error(ME4, "198.18.1.1", 3, 3, &inbound).build()
            ),
            "port unreachable back to the sender"
        );
        assert!(bpf.counter(LO, DIR_INGRESS, counter::ALLOWED_RELATED) >= 3);
    }
}

const UNTRACKED: &str = r#"
[[security_group]]
id = "sg-u"
ingress = [
  { protocol = "tcp", ports = "80", from = ["0.0.0.0/0"] },
  { protocol = "tcp", ports = "22", from = ["198.18.0.0/16"] },
]
egress = [{ protocol = "tcp", ports = "0-65535", to = ["0.0.0.0/0"] }]
[[interface]]
id = "eni-u"
groups = ["sg-u"]
"#;

#[test]
fn untracked_flows_are_not_tracked_and_are_cut_when_the_rule_goes() {
    if !require_root("untracked_flows") {
        return;
    }
    let locals = [LocalInterface {
        ifindex: LO,
        eni: "eni-u".into(),
    }];
    let mut bpf = Bpf::with_state(&state(UNTRACKED), &locals, &sizes());
    for ingress in Hook::INGRESS {
        bpf.dp.flush_flows().unwrap();
        assert!(bpf.run(ingress, &tcp("198.19.1.1", ME4, 40000, 80, TH_SYN).build()));
        assert!(bpf.run(ingress, &tcp("198.18.1.1", ME4, 40000, 22, TH_SYN).build()));
        let flows = bpf.dp.tables().flows().unwrap();
        assert_eq!(
            flows.len(),
            1,
            "{ingress:?}: only the tcp 22 flow (peer not 0/0) is tracked: {flows:?}"
        );
        assert_eq!(u16::from_be_bytes(flows[0].0.local_port), 22);
    }
    assert!(bpf.counter(LO, DIR_INGRESS, counter::ALLOWED_UNTRACKED) >= 2);
    // Remove the rule: the untracked flow is cut at once.
    let without = UNTRACKED.replace(
        r#"{ protocol = "tcp", ports = "80", from = ["0.0.0.0/0"] },"#,
        "",
    );
    bpf.program(&state(&without), &locals, &Options::default());
    for ingress in Hook::INGRESS {
        assert!(
            !bpf.run(ingress, &tcp("198.19.1.1", ME4, 40000, 80, TH_ACK).build()),
            "{ingress:?}"
        );
        // The tracked flow survives the change.
        assert!(
            bpf.run(ingress, &tcp("198.18.1.1", ME4, 40000, 22, TH_ACK).build()),
            "{ingress:?}"
        );
    }
}

fn flow_state(bpf: &mut Bpf, local_port: u16) -> (u8, bool) {
    let flows = bpf.dp.tables().flows().unwrap();
    let f = flows
        .iter()
        .find(|(k, _, _)| u16::from_be_bytes(k.local_port) == local_port)
        .unwrap_or_else(|| panic!("no flow with local port {local_port}: {flows:?}"));
    (f.1.tcp_state, f.2)
}

#[test]
fn tcp_transitions_and_timeouts() {
    if !require_root("tcp_transitions_and_timeouts") {
        return;
    }
    let ing = Hook::TcIngress;
    let eg = Hook::TcEgress;
    let mut bpf = main_bpf();
    // Handshake: embryonic, then established (promoted to the established table).
    assert!(bpf.run(eg, &tcp(ME4, "198.19.1.1", 41000, 443, TH_SYN).build()));
    assert_eq!(flow_state(&mut bpf, 41000), (ct::TCP_SYN_SENT, false));
    assert!(bpf.run(
        ing,
        &tcp("198.19.1.1", ME4, 443, 41000, TH_SYN | TH_ACK).build()
    ));
    assert_eq!(flow_state(&mut bpf, 41000), (ct::TCP_SYN_RECV, false));
    assert!(bpf.run(eg, &tcp(ME4, "198.19.1.1", 41000, 443, TH_ACK).build()));
    assert_eq!(flow_state(&mut bpf, 41000), (ct::TCP_ESTABLISHED, true));
    // Idle for a day: still established (5 days).
    bpf.advance_clock(86_400);
    assert!(bpf.run(ing, &tcp("198.19.1.1", ME4, 443, 41000, TH_ACK).build()));
    // FIN both ways: time-wait, 120 s.
    assert!(bpf.run(
        eg,
        &tcp(ME4, "198.19.1.1", 41000, 443, TH_FIN | TH_ACK).build()
    ));
    assert_eq!(flow_state(&mut bpf, 41000).0, ct::TCP_FIN_WAIT);
    assert!(bpf.run(
        ing,
        &tcp("198.19.1.1", ME4, 443, 41000, TH_FIN | TH_ACK).build()
    ));
    assert_eq!(flow_state(&mut bpf, 41000).0, ct::TCP_TIME_WAIT);
    bpf.advance_clock(100);
    assert!(
        bpf.run(ing, &tcp("198.19.1.1", ME4, 443, 41000, TH_ACK).build()),
        "within time-wait"
    );
    bpf.advance_clock(121);
    assert!(
        !bpf.run(ing, &tcp("198.19.1.1", ME4, 443, 41000, TH_ACK).build()),
        "after time-wait"
    );

    // RST: close, 10 s.
    assert!(bpf.run(eg, &tcp(ME4, "198.19.1.1", 42000, 443, TH_SYN).build()));
    // (acknowledging the SYN: sequence 1 and the SYN make 2)
    assert!(bpf.run(
        ing,
        &tcp("198.19.1.1", ME4, 443, 42000, TH_RST | TH_ACK)
            .seq(0, 2)
            .build()
    ));
    assert_eq!(flow_state(&mut bpf, 42000).0, ct::TCP_CLOSE);
    bpf.advance_clock(5);
    assert!(
        bpf.run(
            ing,
            &tcp("198.19.1.1", ME4, 443, 42000, TH_RST).seq(0, 0).build()
        ),
        "within close timeout"
    );
    bpf.advance_clock(11);
    assert!(
        !bpf.run(ing, &tcp("198.19.1.1", ME4, 443, 42000, TH_ACK).build()),
        "after close timeout"
    );
    // A new SYN after close starts a new connection, evaluated by policy.
    assert!(bpf.run(eg, &tcp(ME4, "198.19.1.1", 42000, 443, TH_SYN).build()));
    assert_eq!(flow_state(&mut bpf, 42000).0, ct::TCP_SYN_SENT);

    // Established flow expires after 5 days idle.
    assert!(bpf.run(eg, &tcp(ME4, "198.19.1.1", 43000, 443, TH_SYN).build()));
    assert!(bpf.run(
        ing,
        &tcp("198.19.1.1", ME4, 443, 43000, TH_SYN | TH_ACK).build()
    ));
    assert!(bpf.run(eg, &tcp(ME4, "198.19.1.1", 43000, 443, TH_ACK).build()));
    bpf.advance_clock(432_001);
    assert!(
        !bpf.run(ing, &tcp("198.19.1.1", ME4, 443, 43000, TH_ACK).build()),
        "established idle > 5 days"
    );

    // SYN-sent expires after 120 s.
    assert!(bpf.run(eg, &tcp(ME4, "198.19.1.1", 44000, 443, TH_SYN).build()));
    bpf.advance_clock(121);
    assert!(
        !bpf.run(
            ing,
            &tcp("198.19.1.1", ME4, 443, 44000, TH_SYN | TH_ACK).build()
        ),
        "syn-sent > 120 s"
    );
}

#[test]
fn udp_icmp_and_other_timeouts() {
    if !require_root("udp_icmp_and_other_timeouts") {
        return;
    }
    let ing = Hook::TcIngress;
    let eg = Hook::TcEgress;
    let mut bpf = main_bpf();
    let out = udp(ME4, "198.19.1.1", 40000, 53).build();
    let back = udp("198.19.1.1", ME4, 53, 40000).build();
    assert!(bpf.run(eg, &out));
    bpf.advance_clock(29);
    assert!(bpf.run(ing, &back), "udp reply within 30 s");
    bpf.advance_clock(31);
    assert!(!bpf.run(ing, &back), "udp idle > 30 s");
    // A stream (both directions, more than once) lives 180 s.
    assert!(bpf.run(eg, &out));
    assert!(bpf.run(ing, &back));
    assert!(bpf.run(eg, &out));
    assert!(bpf.run(ing, &back));
    bpf.advance_clock(170);
    assert!(bpf.run(ing, &back), "udp stream within 180 s");
    bpf.advance_clock(181);
    assert!(!bpf.run(ing, &back), "udp stream idle > 180 s");
    // ICMP 30 s, other protocols 600 s.
    assert!(bpf.run(eg, &icmp(ME4, "198.19.1.1", 8, 0, 5).build()));
    bpf.advance_clock(31);
    assert!(
        !bpf.run(ing, &icmp("198.19.1.1", ME4, 0, 0, 5).build()),
        "icmp > 30 s"
    );
    let gre_out = Spec::new(
        ME4,
        "198.19.1.1",
        L4::Other {
            protocol: 47,
            len: 8,
        },
    )
    .build();
    let gre_in = Spec::new(
        "198.19.1.1",
        ME4,
        L4::Other {
            protocol: 47,
            len: 8,
        },
    )
    .build();
    assert!(bpf.run(eg, &gre_out));
    bpf.advance_clock(590);
    assert!(bpf.run(ing, &gre_in), "other protocol within 600 s");
    bpf.advance_clock(601);
    assert!(!bpf.run(ing, &gre_in), "other protocol idle > 600 s");
}

#[test]
fn per_interface_timeouts_apply() {
    if !require_root("per_interface_timeouts_apply") {
        return;
    }
    let text = STATE.replace(
        "groups = [\"sg-main\"]",
        "groups = [\"sg-main\"]\ntimeouts = { udp = 5 }",
    );
    let mut bpf = Bpf::with_state(
        &state(&text),
        &[LocalInterface {
            ifindex: LO,
            eni: "eni-main".into(),
        }],
        &sizes(),
    );
    assert!(bpf.run(Hook::TcEgress, &udp(ME4, "198.19.1.1", 40000, 53).build()));
    bpf.advance_clock(6);
    assert!(
        !bpf.run(Hook::TcIngress, &udp("198.19.1.1", ME4, 53, 40000).build()),
        "udp timeout of 5 s"
    );
}

#[test]
fn conntrack_full_keeps_established_flows() {
    if !require_root("conntrack_full_keeps_established_flows") {
        return;
    }
    let s = state(STATE);
    let small = MapSizes {
        conntrack: 8,
        conntrack_new: 64,
        ..sizes()
    };
    let mut bpf = Bpf::with_state(
        &s,
        &[LocalInterface {
            ifindex: LO,
            eni: "eni-main".into(),
        }],
        &small,
    );
    let (ing, eg) = (Hook::TcIngress, Hook::TcEgress);
    let establish = |bpf: &mut Bpf, port: u16| -> bool {
        bpf.run(eg, &tcp(ME4, "198.19.1.1", port, 443, TH_SYN).build())
            && bpf.run(
                ing,
                &tcp("198.19.1.1", ME4, 443, port, TH_SYN | TH_ACK).build(),
            )
            && bpf.run(eg, &tcp(ME4, "198.19.1.1", port, 443, TH_ACK).build())
    };
    for port in 30000..30008 {
        assert!(establish(&mut bpf, port), "establishing flow {port}");
    }
    // The table of established flows is full: the next handshake cannot complete.
    assert!(!establish(&mut bpf, 30100));
    assert!(
        bpf.counter(
            LO,
            DIR_EGRESS,
            counter::drop_slot(drop_reason::CONNTRACK_FULL)
        ) >= 1
    );
    // A flood of new flows (SYNs from allowed peers) churns only the embryonic table.
    for i in 0..2000u32 {
        let src = format!("198.18.{}.{}", 1 + i / 250, i % 250 + 1);
        bpf.run(
            Hook::Xdp,
            &tcp(&src, ME4, 1024 + (i % 60000) as u16, 1500, TH_SYN).build(),
        );
    }
    for port in 30000..30008 {
        assert!(
            bpf.run(ing, &tcp("198.19.1.1", ME4, 443, port, TH_ACK).build()),
            "established flow {port} survived the flood"
        );
        assert!(
            bpf.run(
                Hook::Xdp,
                &tcp("198.19.1.1", ME4, 443, port, TH_ACK).build()
            ),
            "established flow {port} (xdp)"
        );
    }
}

#[test]
fn a_flow_on_one_interface_never_opens_a_return_path_on_another() {
    if !require_root("a_flow_on_one_interface_never_opens_a_return_path_on_another") {
        return;
    }
    let ns = Netns::new("ifab");
    ns.ip(&["link", "add", "sga", "type", "veth", "peer", "name", "sgb"]);
    let (a, b) = (ns.ifindex("sga"), ns.ifindex("sgb"));
    let mut text = STATE.to_string();
    text += "[[interface]]\nid = \"eni-b\"\nipv4 = [\"198.18.0.2\"]\ngroups = [\"sg-main\"]\n";
    let s = state(&text);
    let locals = [
        LocalInterface {
            ifindex: a,
            eni: "eni-main".into(),
        },
        LocalInterface {
            ifindex: b,
            eni: "eni-b".into(),
        },
    ];
    let mut bpf = Bpf::with_state(&s, &locals, &sizes());
    ns.enter(|| {
        assert!(bpf.run_on(
            Hook::TcEgress,
            a,
            &tcp(ME4, "198.19.1.1", 40000, 443, TH_SYN).build()
        ));
        assert!(
            !bpf.run_on(
                Hook::TcIngress,
                b,
                &tcp("198.19.1.1", ME4, 443, 40000, TH_SYN | TH_ACK).build()
            ),
            "reply on B"
        );
        assert!(
            bpf.run_on(
                Hook::TcIngress,
                a,
                &tcp("198.19.1.1", ME4, 443, 40000, TH_SYN | TH_ACK).build()
            ),
            "reply on A"
        );
        // Interfaces are enforced each with their own plan: an unknown interface passes.
        assert!(
            bpf.run_on(
                Hook::TcIngress,
                LO,
                &tcp("198.19.1.1", ME4, 443, 40000, TH_ACK).build()
            ),
            "lo is not enforced"
        );
    });
}

#[test]
fn membership_change_admits_new_connections_and_keeps_established_ones() {
    if !require_root("membership_change") {
        return;
    }
    let mut s = state(STATE);
    let locals = [LocalInterface {
        ifindex: LO,
        eni: "eni-main".into(),
    }];
    let mut bpf = Bpf::with_state(&s, &locals, &sizes());
    let ing = Hook::TcIngress;
    // 198.18.21.1 is not in sg-web yet.
    assert!(!bpf.run(ing, &tcp("198.18.21.1", ME4, 40000, 3306, TH_SYN).build()));
    s.network_interfaces
        .push(sg_agent::model::NetworkInterface {
            id: "eni-web2".into(),
            mac: None,
            ipv4: vec!["198.18.21.1".parse().unwrap()],
            ipv6: vec![],
            groups: vec!["sg-web".into()],
            timeouts: Default::default(),
            audit: false,
            owner_id: None,
        });
    bpf.program(&s, &locals, &Options::default());
    assert!(
        bpf.run(ing, &tcp("198.18.21.1", ME4, 40000, 3306, TH_SYN).build()),
        "new member admitted"
    );
    assert!(bpf.run(
        Hook::TcEgress,
        &tcp(ME4, "198.18.21.1", 3306, 40000, TH_SYN | TH_ACK).build()
    ));
    assert!(bpf.run(ing, &tcp("198.18.21.1", ME4, 40000, 3306, TH_ACK).build()));
    s.network_interfaces.pop();
    bpf.program(&s, &locals, &Options::default());
    assert!(
        bpf.run(ing, &tcp("198.18.21.1", ME4, 40000, 3306, TH_ACK).build()),
        "established connection survives leaving"
    );
    assert!(
        !bpf.run(ing, &tcp("198.18.21.1", ME4, 40001, 3306, TH_SYN).build()),
        "new connection denied after leaving"
    );
}

/// The presence filter in front of both tables never hides a flow they hold: idle flows
/// outlive many epochs (the refresh stamps them), and a flow inserted behind the
/// datapath's back (as an earlier build's programs would) is invisible only until the
/// next refresh, which is why loading and attaching switch the filter off.
#[test]
fn the_presence_filter_never_hides_a_flow() {
    if !require_root("the_presence_filter_never_hides_a_flow") {
        return;
    }
    let mut bpf = main_bpf();
    assert!(
        bpf.dp.seen_is_on(),
        "the harness refreshes as the agent does"
    );
    let (ing, eg) = (Hook::Xdp, Hook::TcEgress);
    let peer = "198.18.10.5";
    bpf.sequence(
        "an established flow and an embryonic one",
        &[
            (ing, tcp(peer, ME4, 50000, 22, TH_SYN), true),
            (eg, tcp(ME4, peer, 22, 50000, TH_SYN | TH_ACK), true),
            (ing, tcp(peer, ME4, 50000, 22, TH_ACK), true),
            (ing, tcp(peer, ME4, 50001, 22, TH_SYN), true),
        ],
    );
    for _ in 0..6 {
        bpf.dp.refresh_seen().expect("refresh");
    }
    bpf.sequence(
        "both flows six epochs on",
        &[
            // Egress to the peer's port is allowed only as part of a flow.
            (eg, tcp(ME4, peer, 22, 50000, TH_ACK), true),
            (eg, tcp(ME4, peer, 22, 50001, TH_SYN | TH_ACK), true),
            (eg, tcp(ME4, peer, 22, 50002, TH_ACK), false),
        ],
    );
    // Copies of both flows under other ports, written straight into the tables: no
    // program stamped them. A segment without SYN goes to the tables without asking the
    // filter; the embryonic copy's SYN-ACK asks, and the filter answers "no flow" until a
    // refresh stamps every flow of the tables.
    let flows = bpf.dp.tables().flows().unwrap();
    let copy = |port: u16, to: u16| {
        let (key, entry, established) = flows
            .iter()
            .find(|(k, _, _)| u16::from_be_bytes(k.remote_port) == port)
            .unwrap_or_else(|| panic!("the flow from port {port}"));
        let key = sg_common::CtKey {
            remote_port: to.to_be_bytes(),
            ..*key
        };
        (key, *entry, *established)
    };
    for (key, entry, established) in [copy(50000, 50003), copy(50001, 50004)] {
        let spec = if established {
            sg_common::registry::CT
        } else {
            sg_common::registry::CT_NEW
        };
        let map = bpf.dp.ebpf().map_mut(spec.name).unwrap();
        let mut table: aya::maps::HashMap<_, sg_common::CtKey, sg_common::CtEntry> =
            aya::maps::HashMap::try_from(map).unwrap();
        table.insert(key, entry, 0).unwrap();
    }
    assert!(
        bpf.run(eg, &tcp(ME4, peer, 22, 50003, TH_ACK).build()),
        "an established segment is looked up whatever the filter says"
    );
    let syn_ack = tcp(ME4, peer, 22, 50004, TH_SYN | TH_ACK).build();
    assert!(
        !bpf.run(eg, &syn_ack),
        "an unstamped flow is not looked up while the filter is trusted"
    );
    bpf.dp.refresh_seen().expect("refresh");
    assert!(
        bpf.run(eg, &syn_ack),
        "the refresh stamped every flow of the tables"
    );
}
