//! Random states and packets for differential tests (compiler vs reference evaluator,
//! kernel vs reference evaluator). Deterministic from a seed, so a failure names the seed
//! that reproduces it. Addresses come from the test ranges 198.18.0.0/15 and
//! 2001:db8::/32 only, and from a small pool so that random packets hit random rules.

#![forbid(unsafe_code)]

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use crate::{
    compile::LocalInterface,
    eval::Packet,
    model::{
        Direction, NetworkInterface, Peer, PortMatch, PrefixList, Protocol, Rule, SecurityGroup,
        State,
    },
    net::{Cidr, Family},
};

/// xorshift64*: small, fast, good enough for test generation.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

/// A v4 address of the pool: 198.18.x.y with few distinct values.
pub fn pool_v4(rng: &mut Rng) -> Ipv4Addr {
    Ipv4Addr::new(
        198,
        18 + rng.below(2) as u8,
        rng.below(3) as u8,
        rng.below(6) as u8 * 50,
    )
}

pub fn pool_v6(rng: &mut Rng) -> Ipv6Addr {
    Ipv6Addr::new(
        0x2001,
        0xdb8,
        rng.below(2) as u16,
        0,
        0,
        0,
        rng.below(3) as u16,
        rng.below(6) as u16 * 50,
    )
}

pub fn pool_addr(rng: &mut Rng) -> IpAddr {
    if rng.chance(60) {
        IpAddr::V4(pool_v4(rng))
    } else {
        IpAddr::V6(pool_v6(rng))
    }
}

fn cidr(rng: &mut Rng, family: Family) -> Cidr {
    match family {
        Family::V4 => Cidr::truncate(
            IpAddr::V4(pool_v4(rng)),
            *rng.pick(&[0, 8, 15, 16, 23, 24, 26, 31, 32]),
        ),
        Family::V6 => Cidr::truncate(
            IpAddr::V6(pool_v6(rng)),
            *rng.pick(&[0, 32, 47, 48, 64, 110, 127, 128]),
        ),
    }
}

const PROTOCOLS: [Protocol; 7] = [
    Protocol::All,
    Protocol::TCP,
    Protocol::TCP,
    Protocol::UDP,
    Protocol::ICMP,
    Protocol::ICMPV6,
    Protocol::Number(47),
];

fn port(rng: &mut Rng) -> u16 {
    *rng.pick(&[
        0, 1, 22, 53, 79, 80, 81, 443, 1023, 1024, 3306, 8080, 65534, 65535,
    ])
}

fn rule(rng: &mut Rng, groups: &[String], lists: &[String]) -> Rule {
    let protocol = *rng.pick(&PROTOCOLS);
    let ports = if protocol.has_ports() {
        if rng.chance(20) {
            PortMatch::Ports {
                from: 0,
                to: u16::MAX,
            }
        } else {
            let a = port(rng);
            let b = if rng.chance(50) { a } else { port(rng) };
            PortMatch::Ports {
                from: a.min(b),
                to: a.max(b),
            }
        }
    } else if protocol.is_icmp() {
        let t = *rng.pick(&[
            None,
            Some(0),
            Some(3),
            Some(8),
            Some(128),
            Some(129),
            Some(2),
        ]);
        let c = if t.is_some() {
            *rng.pick(&[None, Some(0), Some(4)])
        } else {
            None
        };
        PortMatch::Icmp {
            icmp_type: t,
            code: c,
        }
    } else {
        PortMatch::Any
    };
    let mut peers = Vec::new();
    for _ in 0..1 + rng.below(3) {
        let kind = rng.below(10);
        let peer = if kind < 5 || (groups.is_empty() && lists.is_empty()) {
            // ICMP rules take CIDRs of their own family (SPEC §3).
            let family = match protocol {
                Protocol::Number(1) => Family::V4,
                Protocol::Number(58) => Family::V6,
                _ if rng.chance(60) => Family::V4,
                _ => Family::V6,
            };
            Peer::Cidr(cidr(rng, family))
        } else if kind < 8 && !groups.is_empty() {
            Peer::Group(rng.pick(groups).clone())
        } else if !lists.is_empty() {
            Peer::PrefixList(rng.pick(lists).clone())
        } else if protocol == Protocol::Number(58) {
            Peer::Cidr("::/0".parse().expect("a CIDR"))
        } else {
            Peer::Cidr(Cidr::ANY_V4)
        };
        peers.push(peer);
    }
    Rule {
        protocol,
        ports,
        peers,
        description: None,
        id: None,
    }
}

/// A random valid state with `interfaces` network interfaces `eni-0`…
pub fn state(rng: &mut Rng, interfaces: usize) -> State {
    let group_ids: Vec<String> = (0..1 + rng.below(4)).map(|i| format!("sg-{i}")).collect();
    let list_ids: Vec<String> = (0..rng.below(3)).map(|i| format!("pl-{i}")).collect();
    let prefix_lists = list_ids
        .iter()
        .map(|id| {
            let family = if rng.chance(50) {
                Family::V4
            } else {
                Family::V6
            };
            PrefixList {
                id: id.clone(),
                name: id.clone(),
                family,
                entries: (0..rng.below(4)).map(|_| cidr(rng, family)).collect(),
            }
        })
        .collect();
    let security_groups = group_ids
        .iter()
        .map(|id| {
            let n = rng.below(6);
            let ingress = (0..n).map(|_| rule(rng, &group_ids, &list_ids)).collect();
            let n = rng.below(5);
            let egress = (0..n).map(|_| rule(rng, &group_ids, &list_ids)).collect();
            SecurityGroup {
                id: id.clone(),
                name: format!("{id}-name"),
                ingress,
                egress,
            }
        })
        .collect();
    // Private addresses are unique across interfaces (SPEC §3): one use per pool address.
    let mut used = std::collections::BTreeSet::new();
    let network_interfaces = (0..interfaces.max(1) + rng.below(3) as usize)
        .map(|i| {
            let mut groups: Vec<String> = group_ids
                .iter()
                .filter(|_| rng.chance(50))
                .cloned()
                .collect();
            groups.dedup();
            NetworkInterface {
                id: format!("eni-{i}"),
                mac: None,
                ipv4: (0..rng.below(3))
                    .map(|_| pool_v4(rng))
                    .filter(|a| used.insert(IpAddr::V4(*a)))
                    .collect(),
                ipv6: (0..rng.below(2))
                    .map(|_| pool_v6(rng))
                    .filter(|a| used.insert(IpAddr::V6(*a)))
                    .collect(),
                groups,
                timeouts: BTreeMap::new(),
                audit: false,
                owner_id: None,
            }
        })
        .collect();
    State {
        security_groups,
        prefix_lists,
        network_interfaces,
        settings: Default::default(),
        warnings: vec![],
    }
}

/// The first `n` interfaces of a generated state, as local interfaces with ifindex i+1.
pub fn locals(state: &State, n: usize) -> Vec<LocalInterface> {
    state
        .network_interfaces
        .iter()
        .take(n)
        .enumerate()
        .map(|(i, ni)| LocalInterface {
            ifindex: i as u32 + 1,
            eni: ni.id.clone(),
        })
        .collect()
}

/// A random packet as policy sees it.
pub fn packet(rng: &mut Rng) -> Packet {
    let direction = if rng.chance(50) {
        Direction::Ingress
    } else {
        Direction::Egress
    };
    let remote = pool_addr(rng);
    let protocol = *rng.pick(&[6u8, 6, 17, 17, 1, 58, 47, 132]);
    let port = match protocol {
        6 | 17 => port(rng),
        1 | 58 => {
            let t = *rng.pick(&[0u8, 3, 8, 128, 129, 2, 11]);
            let c = *rng.pick(&[0u8, 4, 1]);
            (t as u16) << 8 | c as u16
        }
        _ => 0,
    };
    Packet {
        direction,
        protocol,
        remote,
        port,
    }
}
