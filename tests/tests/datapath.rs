//! The kernel programs through BPF_PROG_TEST_RUN: real loaded programs, maps filled by the
//! real compiler, crafted frames. Tables of {description, frame, expected verdict}, run on
//! both ingress hooks (XDP and TC) where the case is about ingress.

use sg_agent::{
    compile::{LocalInterface, Options},
    datapath::MapSizes,
    model::State,
    source::parse_str,
};
use sg_common::{counter, ct, drop_reason, DIR_EGRESS, DIR_INGRESS};
use sg_tests::{
    bpf::{Bpf, Hook, LO},
    netns::Netns,
    packet::{self, icmp, icmp_error, tcp, udp, Spec, L4, TH_ACK, TH_FIN, TH_RST, TH_SYN},
    privileges::require_root,
};

/// The local addresses of the interface under test.
const ME4: &str = "198.18.0.1";
const ME6: &str = "2001:db8:1::1";

const STATE: &str = r#"
[[prefix_list]]
id = "pl-v4"
family = "ipv4"
entries = ["198.18.50.0/24"]

[[security_group]]
id = "sg-web"
[[security_group]]
id = "sg-empty"

[[security_group]]
id = "sg-main"
ingress = [
  { protocol = "tcp", ports = "22", from = ["198.18.10.0/24", "2001:db8:1:10::/64"] },
  { protocol = "tcp", ports = "1000-2000", from = ["198.18.0.0/16", "2001:db8:1::/48"] },
  { protocol = "udp", ports = "5000-5010", from = ["198.18.0.0/16", "2001:db8:1::/48"] },
  { protocol = "icmp", icmp_type = 8, from = ["198.18.0.0/16"] },
  { protocol = "icmp", icmp_type = 13, icmp_code = 0, from = ["198.18.0.0/16"] },
  { protocol = "icmpv6", icmp_type = 128, from = ["2001:db8:1::/48"] },
  { protocol = 47, from = ["198.18.0.0/16", "2001:db8:1::/48"] },
  { protocol = "132", from = ["198.18.0.0/16", "2001:db8:1::/48"] },
  { protocol = "tcp", ports = "3306", from = ["sg-web"] },
  { protocol = "tcp", ports = "4000", from = ["sg-empty"] },
  { protocol = "tcp", ports = "8080", from = ["pl-v4"] },
  { protocol = "tcp", ports = "3307", from = ["198.18.30.0/24"] },
  { protocol = "all", from = ["198.18.30.5/32"] },
]
egress = [
  { protocol = "tcp", ports = "443", to = ["0.0.0.0/0", "::/0"] },
  { protocol = "udp", ports = "53", to = ["198.18.0.0/15", "2001:db8::/32"] },
  { protocol = "icmp", icmp_type = 8, to = ["198.18.0.0/15"] },
  { protocol = "icmpv6", icmp_type = 128, to = ["2001:db8::/32"] },
  { protocol = 47, to = ["198.19.0.0/16", "2001:db8:2::/48"] },
]

[[interface]]
id = "eni-main"
ipv4 = ["198.18.0.1"]
ipv6 = ["2001:db8:1::1"]
groups = ["sg-main"]

[[interface]]
id = "eni-web"
ipv4 = ["198.18.20.1"]
ipv6 = ["2001:db8:1:20::1"]
groups = ["sg-web"]
"#;

fn sizes() -> MapSizes {
    MapSizes {
        conntrack: 4096,
        conntrack_new: 4096,
        addresses: 4096,
        networks: 4096,
        ports: 4096,
        interfaces: 16,
        rules: 1024,
        fragments: 256,
    }
}

fn state(text: &str) -> State {
    parse_str(text).unwrap_or_else(|p| panic!("{p:#?}"))
}

fn main_bpf() -> Bpf {
    let s = state(STATE);
    Bpf::with_state(
        &s,
        &[LocalInterface {
            ifindex: LO,
            eni: "eni-main".into(),
        }],
        &sizes(),
    )
}

/// Ingress policy cases: (description, frame, pass).
fn ingress_cases() -> Vec<(String, Vec<u8>, bool)> {
    let mut cases: Vec<(String, Spec, bool)> = vec![];
    let mut add = |d: &str, s: Spec, pass: bool| cases.push((d.to_string(), s, pass));
    // TCP, both families, port edges.
    add(
        "tcp 22 from admin /24",
        tcp("198.18.10.5", ME4, 40000, 22, TH_SYN),
        true,
    );
    add(
        "tcp 22 from outside admin /24",
        tcp("198.18.11.5", ME4, 40000, 22, TH_SYN),
        false,
    );
    add(
        "tcp6 22 from admin /64",
        tcp("2001:db8:1:10::5", ME6, 40000, 22, TH_SYN),
        true,
    );
    add(
        "tcp6 22 from outside /64",
        tcp("2001:db8:1:11::5", ME6, 40000, 22, TH_SYN),
        false,
    );
    for (port, pass) in [
        (999, false),
        (1000, true),
        (1001, true),
        (1500, true),
        (1999, true),
        (2000, true),
        (2001, false),
    ] {
        add(
            &format!("tcp range edge {port}"),
            tcp("198.18.1.1", ME4, 40000, port, TH_SYN),
            pass,
        );
        add(
            &format!("tcp6 range edge {port}"),
            tcp("2001:db8:1:5::1", ME6, 40000, port, TH_SYN),
            pass,
        );
    }
    add(
        "tcp range from outside",
        tcp("198.19.1.1", ME4, 40000, 1500, TH_SYN),
        false,
    );
    add(
        "tcp6 range from outside",
        tcp("2001:db8:2::1", ME6, 40000, 1500, TH_SYN),
        false,
    );
    // UDP.
    for (port, pass) in [
        (4999, false),
        (5000, true),
        (5005, true),
        (5010, true),
        (5011, false),
    ] {
        add(
            &format!("udp edge {port}"),
            udp("198.18.1.1", ME4, 40000, port),
            pass,
        );
        add(
            &format!("udp6 edge {port}"),
            udp("2001:db8:1:5::1", ME6, 40000, port),
            pass,
        );
    }
    // ICMP type/code with -1.
    add("icmp echo", icmp("198.18.1.1", ME4, 8, 0, 7), true);
    add(
        "icmp echo code 5 (code -1)",
        icmp("198.18.1.1", ME4, 8, 5, 7),
        true,
    );
    add(
        "icmp echo from outside",
        icmp("198.19.1.1", ME4, 8, 0, 7),
        false,
    );
    add(
        "icmp timestamp 13/0",
        icmp("198.18.1.1", ME4, 13, 0, 7),
        true,
    );
    add(
        "icmp timestamp 13/1",
        icmp("198.18.1.1", ME4, 13, 1, 7),
        false,
    );
    add(
        "icmp type 17 not allowed",
        icmp("198.18.1.1", ME4, 17, 0, 7),
        false,
    );
    add(
        "icmp unsolicited echo reply",
        icmp("198.18.1.1", ME4, 0, 0, 7),
        false,
    );
    add("icmpv6 echo", icmp("2001:db8:1:5::1", ME6, 128, 0, 7), true);
    add(
        "icmpv6 echo from outside",
        icmp("2001:db8:2::1", ME6, 128, 0, 7),
        false,
    );
    add(
        "icmpv6 type 200",
        icmp("2001:db8:1:5::1", ME6, 200, 0, 7),
        false,
    );
    // Other protocols by number.
    for (proto, pass) in [(47u8, true), (132, true), (50, false), (4, false)] {
        add(
            &format!("protocol {proto}"),
            Spec::new(
                "198.18.1.1",
                ME4,
                L4::Other {
                    protocol: proto,
                    len: 24,
                },
            ),
            pass,
        );
        add(
            &format!("protocol {proto} v6"),
            Spec::new(
                "2001:db8:1:5::1",
                ME6,
                L4::Other {
                    protocol: proto,
                    len: 24,
                },
            ),
            pass,
        );
        add(
            &format!("protocol {proto} from outside"),
            Spec::new(
                "198.19.1.1",
                ME4,
                L4::Other {
                    protocol: proto,
                    len: 24,
                },
            ),
            false,
        );
    }
    // Group reference, empty group, prefix list.
    add(
        "group member v4",
        tcp("198.18.20.1", ME4, 40000, 3306, TH_SYN),
        true,
    );
    add(
        "group member v6",
        tcp("2001:db8:1:20::1", ME6, 40000, 3306, TH_SYN),
        true,
    );
    add(
        "group non-member",
        tcp("198.18.20.2", ME4, 40000, 3306, TH_SYN),
        false,
    );
    add(
        "group member wrong port",
        tcp("198.18.20.1", ME4, 40000, 3305, TH_SYN),
        false,
    );
    add(
        "empty group matches nothing",
        tcp("198.18.20.1", ME4, 40000, 4000, TH_SYN),
        false,
    );
    add(
        "empty group matches nothing v6",
        tcp("2001:db8:1:5::1", ME6, 40000, 4000, TH_SYN),
        false,
    );
    add(
        "prefix list entry",
        tcp("198.18.50.7", ME4, 40000, 8080, TH_SYN),
        true,
    );
    add(
        "prefix list non-entry",
        tcp("198.18.51.7", ME4, 40000, 8080, TH_SYN),
        false,
    );
    // Overlapping peers are a union (SPEC §1.6a).
    add(
        "overlap: /32 all traffic, port of /24 rule",
        tcp("198.18.30.5", ME4, 40000, 3307, TH_SYN),
        true,
    );
    add(
        "overlap: /32 all traffic, other port",
        tcp("198.18.30.5", ME4, 40000, 9999, TH_SYN),
        true,
    );
    add(
        "overlap: /32 all traffic, udp",
        udp("198.18.30.5", ME4, 40000, 9999),
        true,
    );
    add(
        "overlap: /24 neighbour, its port",
        tcp("198.18.30.6", ME4, 40000, 3307, TH_SYN),
        true,
    );
    add(
        "overlap: /24 neighbour, other port",
        tcp("198.18.30.6", ME4, 40000, 9999, TH_SYN),
        false,
    );
    add(
        "overlap: /16 range port from /24",
        tcp("198.18.30.6", ME4, 40000, 1500, TH_SYN),
        true,
    );
    // VLAN tags.
    let mut v = tcp("198.18.10.5", ME4, 40000, 22, TH_SYN);
    v.vlans = vec![10];
    add("one vlan tag, allowed", v.clone(), true);
    v.vlans = vec![10, 20];
    add("two vlan tags, allowed", v.clone(), true);
    v.vlans = vec![10, 20, 30];
    add("three vlan tags: malformed", v.clone(), false);
    let mut v = tcp("198.18.11.5", ME4, 40000, 22, TH_SYN);
    v.vlans = vec![10, 20];
    add("two vlan tags, denied", v, false);
    // IPv4 options.
    for opts in [4, 8, 20, 40] {
        let mut o = tcp("198.18.10.5", ME4, 40000, 22, TH_SYN);
        o.ipv4_options = opts;
        add(
            &format!("ipv4 options {opts} bytes, allowed"),
            o.clone(),
            true,
        );
        let mut d = tcp("198.18.11.5", ME4, 40000, 22, TH_SYN);
        d.ipv4_options = opts;
        add(&format!("ipv4 options {opts} bytes, denied"), d, false);
    }
    // IPv6 extension headers.
    for chain in [
        vec![0u8],
        vec![60],
        vec![43],
        vec![51],
        vec![0, 60, 43],
        vec![0, 60, 43, 60, 51, 60],
    ] {
        let mut e = tcp("2001:db8:1:10::5", ME6, 40000, 22, TH_SYN);
        e.ipv6_ext = chain.clone();
        add(&format!("ipv6 ext {chain:?}, allowed"), e, true);
        let mut d = tcp("2001:db8:1:11::5", ME6, 40000, 22, TH_SYN);
        d.ipv6_ext = chain.clone();
        add(&format!("ipv6 ext {chain:?}, denied"), d, false);
    }
    let mut long = tcp("2001:db8:1:10::5", ME6, 40000, 22, TH_SYN);
    long.ipv6_ext = vec![60; 7];
    add("ipv6 ext chain of 7: too long", long, false);
    let mut frag_long = tcp("2001:db8:1:10::5", ME6, 40000, 22, TH_SYN);
    frag_long.ipv6_ext = vec![60; 6];
    frag_long.fragment = Some((9, 0, true));
    add("ipv6 six ext + fragment header: too long", frag_long, false);
    // Infrastructure passes whatever the rules.
    add(
        "icmpv6 neighbour solicitation",
        icmp("2001:db8:2::9", ME6, 135, 0, 0),
        true,
    );
    add(
        "icmpv6 neighbour advertisement",
        icmp("2001:db8:2::9", ME6, 136, 0, 0),
        true,
    );
    add(
        "icmpv6 router solicitation",
        icmp("2001:db8:2::9", ME6, 133, 0, 0),
        true,
    );
    add(
        "icmpv6 router advertisement",
        icmp("2001:db8:2::9", ME6, 134, 0, 0),
        true,
    );
    add(
        "icmpv6 redirect",
        icmp("2001:db8:2::9", ME6, 137, 0, 0),
        true,
    );
    add("mld query", icmp("2001:db8:2::9", ME6, 130, 0, 0), true);
    add("mldv2 report", icmp("2001:db8:2::9", ME6, 143, 0, 0), true);
    add(
        "dhcpv4 server to client",
        udp("198.19.0.1", ME4, 67, 68),
        true,
    );
    add(
        "dhcpv4 client to server",
        udp("198.19.0.1", ME4, 68, 67),
        true,
    );
    add(
        "dhcpv6 server to client",
        udp("2001:db8:2::1", ME6, 547, 546),
        true,
    );
    add(
        "udp 67 from arbitrary port is not dhcp",
        udp("198.19.0.1", ME4, 1234, 67),
        false,
    );
    let mut out: Vec<(String, Vec<u8>, bool)> = cases
        .into_iter()
        .map(|(d, s, p)| (d, s.build(), p))
        .collect();
    out.push(("arp".into(), packet::arp(), true));
    out.push(("lldp (not IP)".into(), packet::ethertype(0x88cc), true));
    out.push(("ipx (not IP)".into(), packet::ethertype(0x8137), true));
    out
}

#[test]
fn ingress_policy_table_on_both_hooks() {
    if !require_root("ingress_policy_table_on_both_hooks") {
        return;
    }
    let mut bpf = main_bpf();
    let cases = ingress_cases();
    let mut ran = 0;
    for hook in Hook::INGRESS {
        for (description, frame, pass) in &cases {
            bpf.dp.flush_flows().unwrap();
            assert_eq!(bpf.run(hook, frame), *pass, "{hook:?}: {description}");
            ran += 1;
        }
    }
    assert!(ran >= 200, "{ran} cases");
    eprintln!("ingress policy: {ran} cases");
}

#[test]
fn egress_policy_table() {
    if !require_root("egress_policy_table") {
        return;
    }
    let mut bpf = main_bpf();
    let cases: Vec<(&str, Spec, bool)> = vec![
        (
            "tcp 443 anywhere",
            tcp(ME4, "198.19.1.1", 40000, 443, TH_SYN),
            true,
        ),
        (
            "tcp6 443 anywhere",
            tcp(ME6, "2001:db8:2::1", 40000, 443, TH_SYN),
            true,
        ),
        ("tcp 444", tcp(ME4, "198.19.1.1", 40000, 444, TH_SYN), false),
        ("udp 53 in range", udp(ME4, "198.19.1.1", 40000, 53), true),
        (
            "udp6 53 in range",
            udp(ME6, "2001:db8:2::1", 40000, 53),
            true,
        ),
        ("udp 54", udp(ME4, "198.19.1.1", 40000, 54), false),
        ("icmp echo", icmp(ME4, "198.19.1.1", 8, 0, 1), true),
        ("icmp timestamp", icmp(ME4, "198.19.1.1", 13, 0, 1), false),
        ("icmpv6 echo", icmp(ME6, "2001:db8:2::1", 128, 0, 1), true),
        (
            "gre to 198.19/16",
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
            "gre to 198.18/16",
            Spec::new(
                ME4,
                "198.18.1.1",
                L4::Other {
                    protocol: 47,
                    len: 8,
                },
            ),
            false,
        ),
        (
            "gre6",
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
            "sctp",
            Spec::new(
                ME4,
                "198.19.1.1",
                L4::Other {
                    protocol: 132,
                    len: 8,
                },
            ),
            false,
        ),
    ];
    for (d, s, pass) in &cases {
        bpf.dp.flush_flows().unwrap();
        assert_eq!(bpf.run(Hook::TcEgress, &s.build()), *pass, "egress: {d}");
    }
}

/// A sequence of (hook, frame, expected) run in order on the same conntrack table.
fn sequence(bpf: &mut Bpf, name: &str, steps: &[(Hook, Spec, bool)]) {
    for (i, (hook, spec, pass)) in steps.iter().enumerate() {
        assert_eq!(
            bpf.run(*hook, &spec.build()),
            *pass,
            "{name}: step {i} ({hook:?} {:?})",
            spec.l4
        );
    }
}

#[test]
fn stateful_sequences_in_both_orders() {
    if !require_root("stateful_sequences_in_both_orders") {
        return;
    }
    for ingress in Hook::INGRESS {
        let mut bpf = main_bpf();
        let eg = Hook::TcEgress;
        sequence(
            &mut bpf,
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
        sequence(
            &mut bpf,
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
        sequence(
            &mut bpf,
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
        sequence(
            &mut bpf,
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
        sequence(
            &mut bpf,
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
        sequence(
            &mut bpf,
            "udp6",
            &[
                (eg, udp(ME6, "2001:db8:2::1", 40000, 53), true),
                (ingress, udp("2001:db8:2::1", ME6, 53, 40000), true),
                (ingress, udp("2001:db8:2::1", ME6, 53, 40001), false),
            ],
        );
        sequence(
            &mut bpf,
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
        sequence(
            &mut bpf,
            "icmpv6 echo",
            &[
                (eg, icmp(ME6, "2001:db8:2::1", 128, 0, 77), true),
                (ingress, icmp("2001:db8:2::1", ME6, 129, 0, 77), true),
                (ingress, icmp("2001:db8:2::1", ME6, 128, 0, 77), false),
            ],
        );
        sequence(
            &mut bpf,
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
        let flows = bpf.dp.flows().unwrap();
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
    let flows = bpf.dp.flows().unwrap();
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
    assert!(bpf.run(
        ing,
        &tcp("198.19.1.1", ME4, 443, 42000, TH_RST | TH_ACK).build()
    ));
    assert_eq!(flow_state(&mut bpf, 42000).0, ct::TCP_CLOSE);
    bpf.advance_clock(5);
    assert!(
        bpf.run(ing, &tcp("198.19.1.1", ME4, 443, 42000, TH_RST).build()),
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
fn malformed_frames_are_dropped_and_counted() {
    if !require_root("malformed_frames_are_dropped_and_counted") {
        return;
    }
    let mut bpf = main_bpf();
    let mut ran = 0;
    for hook in [Hook::Xdp, Hook::TcIngress] {
        // Truncation at every byte offset (BPF_PROG_TEST_RUN needs a whole Ethernet header).
        for good in [
            tcp("198.18.10.5", ME4, 40000, 22, TH_SYN),
            tcp("2001:db8:1:10::5", ME6, 40000, 22, TH_SYN),
            udp("198.18.1.1", ME4, 40000, 5001),
            icmp("198.18.1.1", ME4, 8, 0, 1),
        ] {
            let frame = good.build();
            bpf.dp.flush_flows().unwrap();
            assert!(bpf.run(hook, &frame), "{hook:?}: the whole frame passes");
            for len in 14..frame.len() {
                bpf.dp.flush_flows().unwrap();
                match bpf.try_run_raw(hook, LO, &frame[..len], 1) {
                    Ok((pass, _)) => {
                        assert!(!pass, "{hook:?}: {:?} truncated to {len} bytes", good.l4)
                    }
                    // The skb test run refuses frames whose IP header is cut (XDP covers them).
                    Err(_)
                        if hook != Hook::Xdp
                            && len < 14 + if good.src.is_ipv6() { 40 } else { 20 } =>
                    {
                        continue
                    }
                    Err(e) => panic!("{hook:?}: truncated to {len}: {e:?}"),
                }
                ran += 1;
            }
        }
        // IHL 0–15: below 5 is malformed; 5–15 with the options present is fine.
        for ihl in 0u8..=15 {
            let mut s = tcp("198.18.10.5", ME4, 40000, 22, TH_SYN);
            s.ipv4_options = (ihl.max(5) as usize - 5) * 4;
            let mut frame = s.build();
            frame[14] = 0x40 | ihl;
            bpf.dp.flush_flows().unwrap();
            assert_eq!(bpf.run(hook, &frame), ihl >= 5, "{hook:?}: IHL {ihl}");
            ran += 1;
        }
        // IHL larger than the header actually present.
        let mut frame = tcp("198.18.10.5", ME4, 40000, 22, TH_SYN).build();
        frame[14] = 0x4f;
        assert!(!bpf.run(hook, &frame), "{hook:?}: IHL beyond total length");
        // Total length beyond the frame, and below the header.
        let frame = tcp("198.18.10.5", ME4, 40000, 22, TH_SYN).build();
        for total in [41u16, 100, 1500, 65535, 19, 0] {
            let mut f = frame.clone();
            f[16..18].copy_from_slice(&total.to_be_bytes());
            assert!(!bpf.run(hook, &f), "{hook:?}: total length {total}");
            ran += 1;
        }
        // Ethernet padding after a short total length is legal.
        let mut padded = frame.clone();
        padded.extend_from_slice(&[0; 6]);
        bpf.dp.flush_flows().unwrap();
        assert!(
            bpf.run(hook, &padded),
            "{hook:?}: trailing Ethernet padding"
        );
        // IPv6 payload length beyond the frame.
        let mut f6 = tcp("2001:db8:1:10::5", ME6, 40000, 22, TH_SYN).build();
        f6[18..20].copy_from_slice(&200u16.to_be_bytes());
        assert!(
            !bpf.run(hook, &f6),
            "{hook:?}: ipv6 payload length beyond frame"
        );
        // Wrong IP version in the header.
        let mut bad = frame.clone();
        bad[14] = 0x65;
        assert!(!bpf.run(hook, &bad), "{hook:?}: version 6 in an IPv4 frame");
        // TCP data offset below 5.
        let mut off = frame.clone();
        off[14 + 20 + 12] = 0x40;
        assert!(!bpf.run(hook, &off), "{hook:?}: tcp data offset 4");
        ran += 5;
    }
    let drops = |bpf: &mut Bpf, r| bpf.counter(LO, DIR_INGRESS, counter::drop_slot(r));
    assert!(drops(&mut bpf, drop_reason::TRUNCATED_IP) > 0);
    assert!(drops(&mut bpf, drop_reason::TRUNCATED_L4) > 0);
    assert!(drops(&mut bpf, drop_reason::BAD_IHL) > 0);
    assert!(drops(&mut bpf, drop_reason::BAD_LENGTH) > 0);
    eprintln!("malformed corpus: {ran} cases");
}

#[test]
fn fragments_follow_their_first_fragment() {
    if !require_root("fragments_follow_their_first_fragment") {
        return;
    }
    for hook in Hook::INGRESS {
        let mut bpf = main_bpf();
        for (src, dst, denied_src, id) in [
            ("198.18.10.5", ME4, "198.18.11.5", 0x100u32),
            ("2001:db8:1:10::5", ME6, "2001:db8:1:11::5", 0x200),
        ] {
            let mut first = tcp(src, dst, 40000, 22, TH_SYN);
            first.payload = 64;
            first.fragment = Some((id, 0, true));
            assert!(
                bpf.run(hook, &first.build()),
                "{hook:?} {src}: first fragment"
            );
            let mut later = Spec::new(
                src,
                dst,
                L4::FragmentData {
                    protocol: 6,
                    len: 64,
                },
            );
            later.fragment = Some((id, 88, true));
            assert!(
                bpf.run(hook, &later.build()),
                "{hook:?} {src}: middle fragment"
            );
            later.fragment = Some((id, 176, false));
            assert!(
                bpf.run(hook, &later.build()),
                "{hook:?} {src}: last fragment"
            );
            // The denied datagram's later fragments are dropped with it.
            let mut first = tcp(denied_src, dst, 40000, 22, TH_SYN);
            first.fragment = Some((id + 1, 0, true));
            assert!(
                !bpf.run(hook, &first.build()),
                "{hook:?} {denied_src}: denied first fragment"
            );
            let mut later = Spec::new(
                denied_src,
                dst,
                L4::FragmentData {
                    protocol: 6,
                    len: 64,
                },
            );
            later.fragment = Some((id + 1, 88, false));
            assert!(
                !bpf.run(hook, &later.build()),
                "{hook:?}: fragment of a denied datagram"
            );
            // An orphan non-first fragment is dropped.
            let mut orphan = Spec::new(
                src,
                dst,
                L4::FragmentData {
                    protocol: 6,
                    len: 64,
                },
            );
            orphan.fragment = Some((id + 2, 88, false));
            assert!(
                !bpf.run(hook, &orphan.build()),
                "{hook:?} {src}: orphan fragment"
            );
        }
        assert_eq!(
            bpf.counter(
                LO,
                DIR_INGRESS,
                counter::drop_slot(drop_reason::FRAGMENT_ORPHAN)
            ),
            2
        );
        assert_eq!(bpf.counter(LO, DIR_INGRESS, counter::ALLOWED_FRAGMENT), 4);
    }
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

/// Reads every flow event waiting in the ring buffer.
fn drain_events(bpf: &mut Bpf) -> Vec<sg_common::FlowEvent> {
    let map = bpf
        .dp
        .ebpf()
        .map_mut(sg_common::MAP_EVENTS)
        .expect("SG_EVENTS");
    let mut ring = aya::maps::RingBuf::try_from(map).expect("ring buffer");
    let mut out = vec![];
    while let Some(item) = ring.next() {
        assert_eq!(item.len(), std::mem::size_of::<sg_common::FlowEvent>());
        // SAFETY: the datapath writes whole FlowEvent records (repr(C), plain data).
        out.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<sg_common::FlowEvent>()) });
    }
    out
}

fn rule_hits(bpf: &mut Bpf, rule_id: u32) -> u64 {
    let map = bpf
        .dp
        .ebpf()
        .map_mut(sg_common::MAP_RULE_HITS)
        .expect("SG_RULE_HITS");
    let hits: aya::maps::PerCpuArray<_, u64> =
        aya::maps::PerCpuArray::try_from(map).expect("per-cpu array");
    hits.get(&rule_id, 0).map(|v| v.iter().sum()).unwrap_or(0)
}

#[test]
fn rule_hits_and_flow_events() {
    if !require_root("rule_hits_and_flow_events") {
        return;
    }
    let mut bpf = main_bpf();
    let _ = drain_events(&mut bpf);
    let remote: std::net::IpAddr = "198.18.10.5".parse().unwrap();
    let grant = match bpf
        .plan
        .lookup(LO, sg_agent::model::Direction::Ingress, remote, 6, 22)
    {
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
    let admitted: Vec<_> = events
        .iter()
        .filter(|e| e.kind == sg_common::EVENT_ADMITTED)
        .collect();
    assert_eq!(admitted.len(), 2, "{events:?}");
    let e = admitted[0];
    assert_eq!(
        (e.rule_id, e.direction, e.protocol, e.family),
        (grant.rule_id, DIR_INGRESS, 6, sg_common::FAMILY_V4)
    );
    assert_eq!(
        (
            u16::from_be_bytes(e.local_port),
            u16::from_be_bytes(e.remote_port)
        ),
        (22, 40000)
    );
    assert_eq!(&e.remote[..4], &[198, 18, 10, 5]);
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
        .filter(|e| e.kind == sg_common::EVENT_DENIED)
        .count();
    assert!(
        (1..=200).contains(&denied),
        "denied events are rate-limited: {denied} of 300"
    );
}
