//! Generated states at scale for benchmarks: N rules and N members, addresses from the
//! test ranges only.

use std::net::{Ipv4Addr, Ipv6Addr};

pub const SERVER_MAC: &str = "02:5e:00:00:ff:01";

/// Member i's IPv4 address: 198.18.0.1 + i (up to ~131k members).
pub fn member_v4(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 1)) + i)
}

pub fn member_v6(i: u32) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, (i >> 16) as u16, i as u16)
}

/// The CIDR peer of rule i (i ≥ 1): a /32 in 198.19.0.0/16 or a /128 in 2001:db8:2::/48.
pub fn rule_peer(i: u32) -> String {
    if i < 65_536 {
        format!("198.19.{}.{}/32", i >> 8, i & 255)
    } else {
        format!("2001:db8:2::{:x}:{:x}/128", i >> 16, i & 0xffff)
    }
}

/// A native-format state: `sg-server` with `rules` rules (rule 0: tcp 3306 from
/// `sg-members`; rule i: tcp 10000 + i % 50000 from `rule_peer(i)`), `members` interfaces
/// in `sg-members` (IPv4 and IPv6), and the server interface `eni-srv`.
pub fn state_text(rules: u32, members: u32) -> String {
    let mut s = String::with_capacity(64 * (rules + members) as usize);
    s += "[[security_group]]\nid = \"sg-members\"\n\n[[security_group]]\nid = \"sg-server\"\ningress = [\n";
    s += "  { protocol = \"tcp\", ports = \"3306\", from = [\"sg-members\"] },\n";
    for i in 1..rules {
        s += &format!(
            "  {{ protocol = \"tcp\", ports = \"{}\", from = [\"{}\"] }},\n",
            10_000 + i % 50_000,
            rule_peer(i)
        );
    }
    s += "]\n\n[[interface]]\nid = \"eni-srv\"\n";
    s +=
        &format!("mac = \"{SERVER_MAC}\"\nipv4 = [\"198.19.255.254\"]\ngroups = [\"sg-server\"]\n");
    s += &members_text(0, members);
    s
}

/// Member interfaces `from..to`.
pub fn members_text(from: u32, to: u32) -> String {
    let mut s = String::new();
    for i in from..to {
        s += &format!(
            "[[interface]]\nid = \"eni-m{i}\"\nipv4 = [\"{}\"]\nipv6 = [\"{}\"]\ngroups = [\"sg-members\"]\n",
            member_v4(i),
            member_v6(i)
        );
    }
    s
}
