//! Fixtures of the datapath tests: the interface under test, its state, map sizes, and the
//! loaded programs with that state programmed.

use sg_agent::{compile::LocalInterface, datapath::MapSizes, model::State, source::parse_str};

use crate::bpf::{Bpf, LO};

/// The local addresses of the interface under test.
pub const ME4: &str = "198.18.0.1";
pub const ME6: &str = "2001:db8:1::1";

/// The state of the datapath tests: one interface (`eni-main`, on loopback) with a
/// group of every kind of rule, a member group and a prefix list.
pub const STATE: &str = r#"
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

/// Small maps, enough for every datapath test.
pub fn sizes() -> MapSizes {
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

/// Parses a state, panicking with every problem.
pub fn state(text: &str) -> State {
    parse_str(text).unwrap_or_else(|p| panic!("{p:#?}"))
}

/// The programs with `STATE` programmed for `eni-main` on loopback.
pub fn main_bpf() -> Bpf {
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
