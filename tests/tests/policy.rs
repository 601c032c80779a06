//! Policy in the kernel programs (BPF_PROG_TEST_RUN): tables of {description, frame,
//! expected verdict} through the real programs and maps filled by the real compiler, on
//! both ingress hooks (XDP and TC) and on egress.

use sg_tests::fixtures::{main_bpf, ME4, ME6};
use sg_tests::{
    bpf::Hook,
    packet::{self, icmp, tcp, udp, Spec, L4, TH_SYN},
    privileges::require_root,
};

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
    // Infrastructure passes whatever the rules, but only as wide as the link (SPEC
    // §1.12): the same types or ports outside that scope are judged by the rules.
    let hops = |mut s: Spec, hop_limit: u8| {
        s.hop_limit = hop_limit;
        s
    };
    for (name, icmp_type) in [
        ("neighbour solicitation", 135),
        ("neighbour advertisement", 136),
        ("router solicitation", 133),
        ("router advertisement", 134),
        ("redirect", 137),
    ] {
        add(
            &format!("icmpv6 {name}, hop limit 255"),
            hops(icmp("2001:db8:2::9", ME6, icmp_type, 0, 0), 255),
            true,
        );
        add(
            &format!("icmpv6 {name} with hop limit 64 is not link traffic"),
            hops(icmp("2001:db8:2::9", ME6, icmp_type, 0, 0), 64),
            false,
        );
    }
    for (name, icmp_type) in [("mld query", 130), ("mldv2 report", 143)] {
        add(
            &format!("{name} from a link-local source, hop limit 1"),
            hops(icmp("fe80::9", ME6, icmp_type, 0, 0), 1),
            true,
        );
        add(
            &format!("{name} from a global source is not link traffic"),
            hops(icmp("2001:db8:2::9", ME6, icmp_type, 0, 0), 1),
            false,
        );
        add(
            &format!("{name} with hop limit 64 is not link traffic"),
            hops(icmp("fe80::9", ME6, icmp_type, 0, 0), 64),
            false,
        );
    }
    add(
        "dhcpv4 server to client",
        udp("198.19.0.1", ME4, 67, 68),
        true,
    );
    add(
        "dhcpv4 client to the broadcast address",
        udp("0.0.0.0", "255.255.255.255", 68, 67),
        true,
    );
    add(
        "dhcpv4 client to a unicast address is not link traffic",
        udp("198.19.0.1", ME4, 68, 67),
        false,
    );
    add(
        "dhcpv6 server to a link-local client",
        udp("fe80::1", "fe80::2", 547, 546),
        true,
    );
    add(
        "dhcpv6 client to all servers and relays",
        udp("fe80::2", "ff02::1:2", 546, 547),
        true,
    );
    add(
        "dhcpv6 server to a global address is not link traffic",
        udp("2001:db8:2::1", ME6, 547, 546),
        false,
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
