//! A differential fuzz campaign of the datapath (`cargo xtask fuzz`, and a short slice in
//! `cargo xtask test`): frames — random, and mutations of valid frames (TCP flags, sequence
//! numbers, lengths, IPv4 options, IPv6 extension headers, fragments, VLAN tags,
//! truncations, flipped bytes) — in stateful conversations through XDP and TC ingress and
//! TC egress, each verdict compared with a reference model of SPEC §1–§2.
//!
//! The model is written from the SPEC, not from the datapath: its own parser of the
//! frame's bytes, its own flow table, TCP state machine and sequence checks, its own
//! fragment memory, and the reference policy evaluator (`sg_agent::eval`, which walks
//! every rule). The kernel's clock is held at the model's time before each frame (the
//! global clock offset), so timeouts expire in both at once.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use sg_agent::{
    compile::{LocalInterface, Options},
    eval::{evaluate, Packet, Verdict},
    model::{Direction, State},
    testgen::Rng,
};
use sg_common::GlobalConfig;

use crate::{
    bpf::{Bpf, Hook, LO},
    fixtures,
    packet::{icmp, icmp_error, tcp, udp, Spec, L4},
};

const TH_FIN: u8 = 0x01;
const TH_SYN: u8 = 0x02;
const TH_RST: u8 = 0x04;
const TH_ACK: u8 = 0x10;
const TH_URG: u8 = 0x20;

/// What a campaign did.
#[derive(Debug, Default)]
pub struct Report {
    pub frames: u64,
    pub passed: u64,
    pub dropped: u64,
    /// Frames the kernel's test run refused before the program ran (an skb whose IP
    /// header is not whole): not verdicts, and not counted in `frames`.
    pub refused: u64,
    pub mutated: u64,
}

// ---------------------------------------------------------------- the model's parser

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Frag {
    None,
    First,
    Later,
}

/// An IP packet as SPEC §2 reads it.
#[derive(Clone, Debug)]
struct Pkt {
    v6: bool,
    proto: u8,
    src: IpAddr,
    dst: IpAddr,
    hop: u8,
    frag: Frag,
    frag_id: u32,
    l4_off: usize,
    sport: u16,
    dport: u16,
    flags: u8,
    seq: u32,
    ack: u32,
    win: u16,
    /// TCP payload bytes plus one for SYN and one for FIN.
    seg_len: u32,
    icmp_type: u8,
    icmp_code: u8,
}

impl Pkt {
    /// A packet of these addresses, not a fragment, its L4 fields still to read.
    fn new(v6: bool, proto: u8, src: IpAddr, dst: IpAddr, hop: u8) -> Pkt {
        Pkt {
            v6,
            proto,
            src,
            dst,
            hop,
            frag: Frag::None,
            frag_id: 0,
            l4_off: 0,
            sport: 0,
            dport: 0,
            flags: 0,
            seq: 0,
            ack: 0,
            win: 0,
            seg_len: 0,
            icmp_type: 0,
            icmp_code: 0,
        }
    }
}

#[derive(Debug)]
enum Parsed {
    /// Cannot be parsed with certainty: dropped (SPEC §2). The reason is read through
    /// `Debug`, in a disagreement's report.
    #[allow(dead_code)]
    Malformed(&'static str),
    /// Not IP (ARP included): passes.
    NotIp,
    Ip(Box<Pkt>),
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    b.get(at..at + 2).map(|x| u16::from_be_bytes([x[0], x[1]]))
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at + 4)
        .map(|x| u32::from_be_bytes([x[0], x[1], x[2], x[3]]))
}

fn v4_at(b: &[u8], at: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(b[at], b[at + 1], b[at + 2], b[at + 3]))
}

fn v6_at(b: &[u8], at: usize) -> IpAddr {
    let mut a = [0u8; 16];
    a.copy_from_slice(&b[at..at + 16]);
    IpAddr::V6(Ipv6Addr::from(a))
}

fn parse(f: &[u8]) -> Parsed {
    use Parsed::Malformed as M;
    let Some(mut ethertype) = be16(f, 12) else {
        return M("truncated ethernet");
    };
    let mut off = 14;
    // Two VLAN tags at most (SPEC §1.13).
    for tags in 0..3 {
        if ethertype != 0x8100 && ethertype != 0x88a8 {
            break;
        }
        if tags == 2 {
            return M("a third VLAN tag");
        }
        let Some(inner) = be16(f, off + 2) else {
            return M("truncated VLAN tag");
        };
        ethertype = inner;
        off += 4;
    }
    match ethertype {
        0x0800 => ipv4(f, off),
        0x86dd => ipv6(f, off),
        _ => Parsed::NotIp,
    }
}

fn ipv4(f: &[u8], off: usize) -> Parsed {
    use Parsed::Malformed as M;
    let Some(h) = f.get(off..off + 20) else {
        return M("truncated IPv4 header");
    };
    if h[0] >> 4 != 4 {
        return M("IP version");
    }
    let ihl = (h[0] & 15) as usize * 4;
    if ihl < 20 {
        return M("IHL below 5");
    }
    // (Total length 0 is IPv4 BIG TCP only on GSO packets over 64 KiB: never here.)
    let total = u16::from_be_bytes([h[2], h[3]]) as usize;
    if total < ihl || off + total > f.len() {
        return M("total length");
    }
    let fo = u16::from_be_bytes([h[6], h[7]]);
    let frag = if fo & 0x1fff != 0 {
        Frag::Later
    } else if fo & 0x2000 != 0 {
        Frag::First
    } else {
        Frag::None
    };
    let mut p = Pkt::new(false, h[9], v4_at(h, 12), v4_at(h, 16), h[8]);
    p.frag = frag;
    p.frag_id = u16::from_be_bytes([h[4], h[5]]) as u32;
    p.l4_off = off + ihl;
    if frag != Frag::Later {
        if let Err(why) = l4(f, &mut p, off + total) {
            return M(why);
        }
    }
    Parsed::Ip(Box::new(p))
}

fn ipv6(f: &[u8], off: usize) -> Parsed {
    use Parsed::Malformed as M;
    let Some(h) = f.get(off..off + 40) else {
        return M("truncated IPv6 header");
    };
    if h[0] >> 4 != 6 {
        return M("IP version");
    }
    let payload = u16::from_be_bytes([h[4], h[5]]) as usize;
    if off + 40 + payload > f.len() || (payload == 0 && h[6] != 0 && h[6] != 59) {
        return M("payload length");
    }
    let mut p = Pkt::new(true, h[6], v6_at(h, 8), v6_at(h, 24), h[7]);
    let is_ext = |n: u8| matches!(n, 0 | 43 | 60 | 51 | 44);
    let (mut next, mut pos, mut fragment_seen) = (h[6], off + 40, false);
    // The walk is bounded (IPV6_EXT_WALK_LIMIT headers) and stops at a non-first
    // fragment's header: its payload is never read as headers.
    for _ in 0..sg_common::IPV6_EXT_WALK_LIMIT {
        match next {
            0 | 43 | 60 | 51 => {
                let (Some(&n), Some(&len)) = (f.get(pos), f.get(pos + 1)) else {
                    return M("truncated extension header");
                };
                // Authentication headers count 4-byte units (+2), the others 8 (+1).
                pos += if next == 51 {
                    (len as usize + 2) * 4
                } else {
                    (len as usize + 1) * 8
                };
                next = n;
            }
            44 => {
                if fragment_seen {
                    return M("a second fragment header");
                }
                fragment_seen = true;
                let Some(e) = f.get(pos..pos + 8) else {
                    return M("truncated fragment header");
                };
                next = e[0];
                let fo = u16::from_be_bytes([e[2], e[3]]);
                p.frag = if fo & 0xfff8 != 0 {
                    Frag::Later
                } else if fo & 1 != 0 {
                    Frag::First
                } else {
                    Frag::None
                };
                p.frag_id = u32::from_be_bytes([e[4], e[5], e[6], e[7]]);
                pos += 8;
                if p.frag == Frag::Later {
                    break;
                }
            }
            _ => break,
        }
    }
    if p.frag != Frag::Later && is_ext(next) {
        return M("extension chain longer than the walk");
    }
    if pos > 0x3fff {
        return M("extension chain past 16 KiB");
    }
    p.proto = next;
    p.l4_off = pos;
    if p.frag != Frag::Later {
        if let Err(why) = l4(f, &mut p, off + 40 + payload) {
            return M(why);
        }
    }
    Parsed::Ip(Box::new(p))
}

/// The L4 header, wholly inside the IP packet that ends at `end` (SPEC §2).
fn l4(f: &[u8], p: &mut Pkt, end: usize) -> Result<(), &'static str> {
    let off = p.l4_off;
    let fits = |n: usize| {
        if off + n <= end {
            Ok(())
        } else {
            Err("L4 header past the IP length")
        }
    };
    match p.proto {
        6 => {
            fits(20)?;
            let doff = (f[off + 12] >> 4) as usize * 4;
            if doff < 20 {
                return Err("TCP data offset below 5");
            }
            fits(doff)?;
            p.sport = be16(f, off).unwrap();
            p.dport = be16(f, off + 2).unwrap();
            p.seq = be32(f, off + 4).unwrap();
            p.ack = be32(f, off + 8).unwrap();
            p.flags = f[off + 13];
            p.win = be16(f, off + 14).unwrap();
            p.seg_len = (end - off - doff) as u32
                + (p.flags & TH_SYN != 0) as u32
                + (p.flags & TH_FIN != 0) as u32;
        }
        17 => {
            fits(8)?;
            p.sport = be16(f, off).unwrap();
            p.dport = be16(f, off + 2).unwrap();
        }
        1 | 58 => {
            fits(8)?;
            p.icmp_type = f[off];
            p.icmp_code = f[off + 1];
            p.sport = be16(f, off + 4).unwrap();
        }
        _ => {}
    }
    Ok(())
}

// ---------------------------------------------------------------- the model's semantics

/// Infrastructure that security groups never filter, only as wide as the link (SPEC
/// §1.12).
fn infrastructure(p: &Pkt) -> bool {
    if p.frag != Frag::None {
        return false;
    }
    let link_local = |a: &IpAddr| matches!(a, IpAddr::V6(v) if v.segments()[0] & 0xffc0 == 0xfe80);
    match (p.v6, p.proto) {
        (true, 58) => match p.icmp_type {
            133..=137 => p.hop == 255,
            130..=132 | 143 => p.hop == 1 && (link_local(&p.src) || p.src.is_unspecified()),
            _ => false,
        },
        (false, 17) => match (p.sport, p.dport) {
            (68, 67) => match p.dst {
                IpAddr::V4(d) => d.is_broadcast() || d.is_link_local(),
                _ => false,
            },
            (67, 68) => true,
            _ => false,
        },
        (true, 17) => {
            let dhcp_group = matches!(p.dst, IpAddr::V6(d)
                if d == "ff02::1:2".parse::<Ipv6Addr>().unwrap()
                    || d == "ff05::1:3".parse::<Ipv6Addr>().unwrap());
            match (p.sport, p.dport) {
                (546, 547) => link_local(&p.dst) || dhcp_group,
                (547, 546) => link_local(&p.dst),
                _ => false,
            }
        }
        _ => false,
    }
}

/// An ICMP query: (request?, pair), as SPEC §1.3 lists them.
fn query(p: &Pkt) -> Option<(bool, u8)> {
    match (p.v6, p.proto, p.icmp_type) {
        (false, 1, 8) => Some((true, 0)),
        (false, 1, 0) => Some((false, 0)),
        (false, 1, 13) => Some((true, 1)),
        (false, 1, 14) => Some((false, 1)),
        (false, 1, 15) => Some((true, 2)),
        (false, 1, 16) => Some((false, 2)),
        (false, 1, 17) => Some((true, 3)),
        (false, 1, 18) => Some((false, 3)),
        (true, 58, 128) => Some((true, 0)),
        (true, 58, 129) => Some((false, 0)),
        (true, 58, 139) => Some((true, 1)),
        (true, 58, 140) => Some((false, 1)),
        _ => None,
    }
}

fn is_icmp_error(p: &Pkt) -> bool {
    match (p.v6, p.proto) {
        (false, 1) => matches!(p.icmp_type, 3 | 11 | 12),
        (true, 58) => matches!(p.icmp_type, 1..=4),
        _ => false,
    }
}

/// The packet an ICMP error quotes: its addresses, protocol and ports (or query).
fn quoted(f: &[u8], outer: &Pkt) -> Option<Pkt> {
    let off = outer.l4_off + 8;
    let mut p = outer.clone();
    p.frag = Frag::None;
    if outer.v6 {
        let h = f.get(off..off + 40)?;
        p.src = v6_at(h, 8);
        p.dst = v6_at(h, 24);
        // Its extension headers, three at most, lead to its L4 header; a non-first
        // fragment has none to quote (SPEC §1.4).
        let (mut next, mut pos) = (h[6], off + 40);
        let mut found = false;
        for _ in 0..4 {
            match next {
                0 | 43 | 60 | 51 => {
                    let e = f.get(pos..pos + 2)?;
                    pos += if next == 51 {
                        (e[1] as usize + 2) * 4
                    } else {
                        (e[1] as usize + 1) * 8
                    };
                    next = e[0];
                }
                44 => {
                    let e = f.get(pos..pos + 4)?;
                    if u16::from_be_bytes([e[2], e[3]]) & 0xfff8 != 0 {
                        return None;
                    }
                    next = e[0];
                    pos += 8;
                }
                _ => {
                    found = true;
                    break;
                }
            }
        }
        if !found {
            return None;
        }
        p.proto = next;
        p.l4_off = pos;
    } else {
        let h = f.get(off..off + 20)?;
        let ihl = (h[0] & 15) as usize * 4;
        if h[0] >> 4 != 4 || ihl < 20 {
            return None;
        }
        p.src = v4_at(h, 12);
        p.dst = v4_at(h, 16);
        p.proto = h[9];
        p.l4_off = off + ihl;
    }
    let q = f.get(p.l4_off..p.l4_off + 8)?;
    (p.sport, p.dport, p.icmp_type, p.icmp_code) = (0, 0, 0, 0);
    match p.proto {
        6 | 17 => {
            p.sport = u16::from_be_bytes([q[0], q[1]]);
            p.dport = u16::from_be_bytes([q[2], q[3]]);
        }
        1 | 58 => {
            p.icmp_type = q[0];
            p.icmp_code = q[1];
            p.sport = u16::from_be_bytes([q[4], q[5]]);
        }
        _ => {}
    }
    Some(p)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Dir {
    In,
    Out,
}

impl Dir {
    fn flip(self) -> Dir {
        match self {
            Dir::In => Dir::Out,
            Dir::Out => Dir::In,
        }
    }
    fn i(self) -> usize {
        match self {
            Dir::In => 0,
            Dir::Out => 1,
        }
    }
}

/// A flow's identity: both directions name it the same way.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    proto: u8,
    local: IpAddr,
    remote: IpAddr,
    local_port: u16,
    remote_port: u16,
    /// ICMP queries: the pair and the direction the request travelled.
    query: Option<(u8, Dir)>,
}

fn key(p: &Pkt, dir: Dir) -> Key {
    let (local, remote, lp, rp) = match dir {
        Dir::In => (p.dst, p.src, p.dport, p.sport),
        Dir::Out => (p.src, p.dst, p.sport, p.dport),
    };
    let (local_port, remote_port, query) = match p.proto {
        6 | 17 => (lp, rp, None),
        1 | 58 => match self::query(p) {
            Some((request, pair)) => {
                let origin = if request { dir } else { dir.flip() };
                (p.sport, 0, Some((pair, origin)))
            }
            None => (0, 0, None),
        },
        _ => (0, 0, None),
    };
    Key {
        proto: p.proto,
        local,
        remote,
        local_port,
        remote_port,
        query,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tcp {
    None,
    SynSent,
    SynRecv,
    Established,
    FinWait,
    TimeWait,
    Close,
}

#[derive(Clone, Copy, Debug, Default)]
struct Side {
    end: Option<u32>,
    ack: Option<(u32, u16)>,
}

#[derive(Clone, Debug)]
struct Flow {
    origin: Dir,
    tcp: Tcp,
    seen_reply: bool,
    stream: bool,
    fins: [bool; 2],
    last_ns: u64,
    packets: u64,
    sides: [Side; 2],
}

/// SPEC §1.11 timeouts (the defaults: the fuzz state sets none).
fn timeout_s(proto: u8, f: &Flow) -> u64 {
    match proto {
        6 => match f.tcp {
            Tcp::SynSent => 120,
            Tcp::SynRecv => 60,
            Tcp::Established => 432_000,
            Tcp::FinWait | Tcp::TimeWait => 120,
            _ => 10,
        },
        17 if f.stream => 180,
        17 => 30,
        1 | 58 => 30,
        _ => 600,
    }
}

fn valid_flags(flags: u8) -> bool {
    let f = flags & (TH_FIN | TH_SYN | TH_RST | TH_ACK | TH_URG);
    let base = f & !TH_URG;
    let allowed = [
        TH_SYN,
        TH_SYN | TH_ACK,
        TH_RST,
        TH_RST | TH_ACK,
        TH_FIN | TH_ACK,
        TH_ACK,
    ];
    allowed.contains(&base) && !(f & TH_URG != 0 && f & TH_RST != 0)
}

/// RFC 5961 as SPEC §1.11 asks: the segment lies between the other side's last
/// acknowledgement and what this side was seen to send plus the other side's window; in
/// SYN_SENT an answer must acknowledge the SYN.
fn plausible(f: &Flow, dir: Dir, p: &Pkt) -> bool {
    let (me, other) = (f.sides[dir.i()], f.sides[dir.flip().i()]);
    if f.tcp == Tcp::SynSent && dir != f.origin {
        return p.flags & TH_ACK != 0 && other.end == Some(p.ack);
    }
    if let Some((ack, win)) = other.ack {
        let sent = match me.end {
            Some(end) if (end.wrapping_sub(ack) as i32) > 0 => end.wrapping_sub(ack),
            _ => 0,
        };
        return p.seq.wrapping_sub(ack) as u64 <= sent as u64 + (win as u64).max(1);
    }
    match me.end {
        Some(end) => p.seq == end,
        None => true,
    }
}

fn tcp_step(f: &mut Flow, dir: Dir, flags: u8, p: &Pkt) {
    // What this side sent and acknowledged.
    let other_end = f.sides[dir.flip().i()].end;
    let me = &mut f.sides[dir.i()];
    let end = p.seq.wrapping_add(p.seg_len);
    if me.end.is_none_or(|e| (end.wrapping_sub(e) as i32) > 0) {
        me.end = Some(end);
    }
    if flags & TH_ACK != 0 {
        let acks_sent = other_end.is_none_or(|e| (e.wrapping_sub(p.ack) as i32) >= 0);
        let newer = me
            .ack
            .is_none_or(|(a, _)| (p.ack.wrapping_sub(a) as i32) >= 0);
        if acks_sent && newer {
            me.ack = Some((p.ack, p.win));
        }
    }
    let from_origin = dir == f.origin;
    if flags & TH_RST != 0 {
        f.tcp = Tcp::Close;
        return;
    }
    if flags & TH_FIN != 0 {
        f.fins[usize::from(!from_origin)] = true;
    }
    let both = f.fins[0] && f.fins[1];
    let any = f.fins[0] || f.fins[1];
    f.tcp = match f.tcp {
        Tcp::SynSent if !from_origin && flags & (TH_SYN | TH_ACK) == TH_SYN | TH_ACK => {
            Tcp::SynRecv
        }
        Tcp::SynRecv if from_origin && flags & TH_ACK != 0 && flags & TH_SYN == 0 => {
            Tcp::Established
        }
        Tcp::Established | Tcp::FinWait if both => Tcp::TimeWait,
        Tcp::Established | Tcp::FinWait if any => Tcp::FinWait,
        other => other,
    };
    if matches!(f.tcp, Tcp::SynSent | Tcp::SynRecv) && both {
        f.tcp = Tcp::TimeWait;
    }
}

/// What a frame changes in the model, applied once its verdict is compared.
enum Effect {
    Put(Key, Flow),
    Remove(Key),
    Remember(FragId, u64),
}

type FragId = (Dir, bool, u8, u32, IpAddr, IpAddr);

/// The reference model of one enforced interface.
struct Model {
    state: State,
    flows: HashMap<Key, Flow>,
    frags: HashMap<FragId, u64>,
}

impl Model {
    fn live(&self, k: &Key, now: u64) -> Option<&Flow> {
        self.flows
            .get(k)
            .filter(|f| now.saturating_sub(f.last_ns) <= timeout_s(k.proto, f) * 1_000_000_000)
    }

    fn policy(&self, dir: Dir, proto: u8, remote: IpAddr, port: u16) -> Verdict {
        let direction = match dir {
            Dir::In => Direction::Ingress,
            Dir::Out => Direction::Egress,
        };
        evaluate(
            &self.state,
            "eni-main",
            &Packet {
                direction,
                protocol: proto,
                remote,
                port,
            },
            false,
        )
    }

    /// The verdict on a frame travelling `dir` at `now`, and what it changes.
    fn judge(&self, frame: &[u8], dir: Dir, now: u64) -> (bool, Vec<Effect>) {
        let p = match parse(frame) {
            Parsed::Malformed(_) => return (false, vec![]),
            Parsed::NotIp => return (true, vec![]),
            Parsed::Ip(p) => p,
        };
        let frag_id = (
            dir,
            p.v6,
            if p.v6 { 0 } else { p.proto },
            p.frag_id,
            p.src,
            p.dst,
        );
        if p.frag == Frag::Later {
            let now_s = now / 1_000_000_000;
            let ok = self
                .frags
                .get(&frag_id)
                .is_some_and(|seen| now_s.wrapping_sub(*seen) <= 30);
            return (ok, vec![]);
        }
        if infrastructure(&p) {
            return (true, vec![]);
        }
        let (pass, mut effects) = self.decide(frame, &p, dir, now);
        if pass && p.frag == Frag::First {
            effects.push(Effect::Remember(frag_id, now / 1_000_000_000));
        }
        (pass, effects)
    }

    fn decide(&self, frame: &[u8], p: &Pkt, dir: Dir, now: u64) -> (bool, Vec<Effect>) {
        if p.proto == 6 && !valid_flags(p.flags) {
            return (false, vec![]);
        }
        if is_icmp_error(p) {
            if let Some(inner) = quoted(frame, p) {
                if p.dst == inner.src && self.live(&key(&inner, dir.flip()), now).is_some() {
                    return (true, vec![]);
                }
            }
        }
        let icmp = matches!(p.proto, 1 | 58);
        let q = query(p);
        let k = key(p, dir);
        if !icmp || q.is_some() {
            if let Some(f) = self.flows.get(&k) {
                let expired = now.saturating_sub(f.last_ns) > timeout_s(k.proto, f) * 1_000_000_000;
                let reopens = p.proto == 6
                    && matches!(f.tcp, Tcp::TimeWait | Tcp::Close)
                    && p.flags & (TH_SYN | TH_ACK | TH_RST) == TH_SYN;
                if !expired && !reopens {
                    let mut f = f.clone();
                    let mut flags = p.flags;
                    if p.proto == 6 && flags & (TH_RST | TH_FIN) != 0 && !plausible(&f, dir, p) {
                        if flags & TH_RST != 0 {
                            return (false, vec![]);
                        }
                        flags &= !TH_FIN;
                    }
                    f.last_ns = now;
                    f.packets += 1;
                    if dir != f.origin {
                        f.seen_reply = true;
                    }
                    match p.proto {
                        6 => tcp_step(&mut f, dir, flags, p),
                        17 if f.seen_reply && f.packets > 2 => f.stream = true,
                        _ => {}
                    }
                    return (true, vec![Effect::Put(k, f)]);
                }
                // A stale flow is forgotten; the packet is judged as new.
                return self.new_flow(p, dir, now, k.clone(), vec![Effect::Remove(k)]);
            }
        }
        self.new_flow(p, dir, now, k, vec![])
    }

    fn new_flow(
        &self,
        p: &Pkt,
        dir: Dir,
        now: u64,
        k: Key,
        mut effects: Vec<Effect>,
    ) -> (bool, Vec<Effect>) {
        let remote = match dir {
            Dir::In => p.src,
            Dir::Out => p.dst,
        };
        let port = match p.proto {
            6 | 17 => p.dport,
            1 | 58 => (p.icmp_type as u16) << 8 | p.icmp_code as u16,
            _ => 0,
        };
        let Verdict::Allow(m) = self.policy(dir, p.proto, remote, port) else {
            return (false, effects);
        };
        if m.untracked && matches!(p.proto, 6 | 17) {
            return (true, effects);
        }
        let opens = match p.proto {
            1 | 58 => matches!(query(p), Some((true, _))),
            6 => p.flags & (TH_SYN | TH_ACK | TH_FIN | TH_RST) == TH_SYN,
            // A reply of a flow the other direction admits untracked opens nothing.
            17 => !matches!(self.policy(dir.flip(), 17, remote, p.sport),
                Verdict::Allow(r) if r.untracked),
            _ => true,
        };
        if opens {
            let mut sides = [Side::default(); 2];
            if p.proto == 6 {
                sides[dir.i()].end = Some(p.seq.wrapping_add(p.seg_len));
            }
            effects.push(Effect::Put(
                k,
                Flow {
                    origin: dir,
                    tcp: if p.proto == 6 {
                        Tcp::SynSent
                    } else {
                        Tcp::None
                    },
                    seen_reply: false,
                    stream: false,
                    fins: [false; 2],
                    last_ns: now,
                    packets: 1,
                    sides,
                },
            ));
        }
        (true, effects)
    }

    fn apply(&mut self, effects: Vec<Effect>) {
        for e in effects {
            match e {
                Effect::Put(k, f) => {
                    self.flows.insert(k, f);
                }
                Effect::Remove(k) => {
                    self.flows.remove(&k);
                }
                Effect::Remember(id, s) => {
                    self.frags.insert(id, s);
                }
            }
        }
    }
}

// ---------------------------------------------------------------- frames

const ME4: &str = fixtures::ME4;
const ME6: &str = fixtures::ME6;
const REMOTES4: [&str; 8] = [
    "198.18.10.5",
    "198.18.1.1",
    "198.18.30.5",
    "198.18.50.7",
    "198.18.20.1",
    "198.19.1.1",
    "198.19.200.9",
    "198.18.0.1",
];
const REMOTES6: [&str; 6] = [
    "2001:db8:1:10::5",
    "2001:db8:1::99",
    "2001:db8:2::7",
    "2001:db8:1:20::1",
    "fe80::1",
    "2001:db8:1::1",
];
const PORTS: [u16; 20] = [
    22, 80, 443, 1000, 1500, 2000, 3306, 3307, 4000, 5000, 5005, 5010, 8080, 53, 67, 68, 546, 547,
    40000, 40001,
];

/// A conversation between the interface and a remote: the frames its two ends would
/// send, in order, unless the campaign chooses otherwise.
#[derive(Clone, Debug)]
struct Conversation {
    v6: bool,
    remote: &'static str,
    proto: u8,
    local_port: u16,
    remote_port: u16,
    /// Who sent the first packet.
    opener: Dir,
    /// The next sequence number of each side (by `Dir` of what it sends), and each
    /// side's view of the other's.
    next: [u32; 2],
    step: u32,
    icmp_id: u16,
    icmp_request: u8,
}

/// Conversations the fuzz state allows (address, protocol, who opens, service port), so
/// that most frames reach conntrack and not only the policy's refusal.
const ALLOWED: [(&str, u8, Dir, u16); 16] = [
    ("198.18.10.5", 6, Dir::In, 22),
    ("198.18.1.1", 6, Dir::In, 1500),
    ("198.18.1.1", 17, Dir::In, 5005),
    ("198.18.1.1", 1, Dir::In, 0),
    ("198.18.1.1", 47, Dir::In, 0),
    ("198.18.30.5", 6, Dir::In, 3307),
    ("198.18.50.7", 6, Dir::In, 8080),
    ("198.18.20.1", 6, Dir::In, 3306),
    ("2001:db8:1:10::5", 6, Dir::In, 22),
    ("2001:db8:1::99", 17, Dir::In, 5005),
    ("2001:db8:1::99", 58, Dir::In, 0),
    ("198.19.1.1", 6, Dir::Out, 443),
    ("2001:db8:2::7", 6, Dir::Out, 443),
    ("198.18.1.1", 17, Dir::Out, 53),
    ("198.19.1.1", 47, Dir::Out, 0),
    ("2001:db8:2::7", 58, Dir::Out, 0),
];

impl Conversation {
    fn new(rng: &mut Rng) -> Conversation {
        let mut c = Conversation::random(rng);
        if rng.chance(65) {
            let (remote, proto, opener, service) = *rng.pick(&ALLOWED);
            c.v6 = remote.contains(':');
            c.remote = remote;
            c.proto = proto;
            c.opener = opener;
            let ephemeral = 32768 + rng.below(8) as u16;
            (c.local_port, c.remote_port) = match opener {
                Dir::In => (service, ephemeral),
                Dir::Out => (ephemeral, service),
            };
            c.icmp_request = match (proto, rng.chance(80)) {
                (1, true) => 8,
                (58, true) => 128,
                _ => c.icmp_request,
            };
        }
        c
    }

    fn random(rng: &mut Rng) -> Conversation {
        let v6 = rng.chance(35);
        let remote = if v6 {
            *rng.pick(&REMOTES6)
        } else {
            *rng.pick(&REMOTES4)
        };
        let proto = match rng.below(100) {
            0..=49 => 6,
            50..=69 => 17,
            70..=84 => {
                if v6 {
                    58
                } else {
                    1
                }
            }
            85..=89 => 47,
            90..=94 => 132,
            _ => *rng.pick(&[0u8, 59, 41, 1, 58]),
        };
        Conversation {
            v6,
            remote,
            proto,
            local_port: *rng.pick(&PORTS),
            remote_port: *rng.pick(&PORTS),
            opener: if rng.chance(50) { Dir::In } else { Dir::Out },
            next: [rng.next_u64() as u32, rng.next_u64() as u32],
            step: 0,
            icmp_id: rng.below(4) as u16,
            icmp_request: if v6 {
                *rng.pick(&[128u8, 139, 135, 1])
            } else {
                *rng.pick(&[8u8, 13, 15, 17, 5, 3])
            },
        }
    }

    fn me(&self) -> &'static str {
        if self.v6 {
            ME6
        } else {
            ME4
        }
    }

    /// The next natural frame of the conversation: its direction and spec.
    fn next_frame(&mut self, rng: &mut Rng) -> (Dir, Spec) {
        let step = self.step;
        self.step += 1;
        // Mostly the opener speaks first, then they alternate, with some noise.
        let dir = if step == 0 || step.is_multiple_of(2) != rng.chance(15) {
            self.opener
        } else {
            self.opener.flip()
        };
        let (src, dst, sport, dport) = match dir {
            Dir::In => (self.remote, self.me(), self.remote_port, self.local_port),
            Dir::Out => (self.me(), self.remote, self.local_port, self.remote_port),
        };
        let spec = match self.proto {
            6 => {
                let flags = match step {
                    0 => TH_SYN,
                    1 => TH_SYN | TH_ACK,
                    _ => match rng.below(20) {
                        0 => TH_FIN | TH_ACK,
                        1 => TH_RST,
                        2 => TH_RST | TH_ACK,
                        _ => TH_ACK,
                    },
                };
                let payload = if step >= 2 && rng.chance(40) {
                    rng.below(300) as usize
                } else {
                    0
                };
                let (me, them) = (dir.i(), dir.flip().i());
                let seq = self.next[me];
                let ack = self.next[them];
                self.next[me] = seq
                    .wrapping_add(payload as u32)
                    .wrapping_add((flags & (TH_SYN | TH_FIN) != 0) as u32);
                let mut s = tcp(src, dst, sport, dport, flags).seq(seq, ack);
                s.payload = payload;
                s
            }
            17 => {
                let mut s = udp(src, dst, sport, dport);
                s.payload = rng.below(64) as usize;
                s
            }
            1 | 58 => {
                let t = if dir == self.opener {
                    self.icmp_request
                } else {
                    match self.icmp_request {
                        8 => 0,
                        128 => 129,
                        t => t + 1,
                    }
                };
                let mut s = icmp(src, dst, t, 0, self.icmp_id);
                if t == 135 || rng.chance(5) {
                    s.hop_limit = *rng.pick(&[255u8, 1]);
                }
                s
            }
            p => Spec::new(
                src,
                dst,
                L4::Other {
                    protocol: p,
                    len: rng.below(40) as usize,
                },
            ),
        };
        (dir, spec)
    }
}

/// Mutations of a valid frame's spec (before it is built).
fn mutate_spec(s: &mut Spec, rng: &mut Rng) {
    match rng.below(9) {
        0 => {
            if let L4::Tcp { flags, .. } = &mut s.l4 {
                *flags = rng.next_u64() as u8;
            }
        }
        1 => {
            if let L4::Tcp { seq, ack, .. } = &mut s.l4 {
                *seq = rng.next_u64() as u32;
                if rng.chance(50) {
                    *ack = rng.next_u64() as u32;
                }
            }
        }
        2 => s.payload = rng.below(1400) as usize,
        3 if !s.src.is_ipv6() => s.ipv4_options = 4 * (1 + rng.below(10) as usize),
        3 => {
            s.ipv6_ext = (0..1 + rng.below(8))
                .map(|_| *rng.pick(&[0u8, 43, 60, 51]))
                .collect()
        }
        4 => {
            let offset = if rng.chance(50) {
                0
            } else {
                8 * (1 + rng.below(40) as u16)
            };
            s.fragment = Some((rng.below(3) as u32, offset, rng.chance(70)));
        }
        5 => s.vlans = (0..1 + rng.below(3)).map(|v| 10 + v as u16).collect(),
        6 => s.hop_limit = *rng.pick(&[1u8, 255, 0, 64]),
        7 => {
            s.ipv6_ext = (0..rng.below(3)).map(|_| *rng.pick(&[0u8, 60])).collect();
            s.fragment = Some((rng.below(3) as u32, 0, true));
        }
        _ => {}
    }
}

/// Mutations of the built frame's bytes.
fn mutate_bytes(f: &mut Vec<u8>, rng: &mut Rng) {
    match rng.below(6) {
        0 if !f.is_empty() => {
            let cut = 1 + rng.below(f.len().min(60) as u64) as usize;
            f.truncate(f.len() - cut);
        }
        1 if !f.is_empty() => {
            let at = rng.below(f.len().min(120) as u64) as usize;
            f[at] ^= 1 << rng.below(8);
        }
        2 if f.len() > 18 => {
            // The IP length fields (IPv4 total length, IPv6 payload length).
            let at = if f[12] == 0x86 { 18 } else { 16 };
            if at + 1 < f.len() {
                let v = rng.next_u64() as u16;
                f[at..at + 2].copy_from_slice(&v.to_be_bytes());
            }
        }
        3 if f.len() > 14 => {
            // Version and IHL.
            f[14] = rng.next_u64() as u8;
        }
        4 => f.extend((0..rng.below(20)).map(|_| rng.next_u64() as u8)),
        _ => {}
    }
}

// ---------------------------------------------------------------- the campaign

/// The fuzz state: the datapath tests' state, plus a group whose UDP rules to and from
/// 0.0.0.0/0 make IPv4 UDP untracked (SPEC §1.11).
fn fuzz_state() -> State {
    let text = fixtures::STATE.replace(
        "groups = [\"sg-main\"]",
        "groups = [\"sg-main\", \"sg-open\"]",
    ) + r#"
[[security_group]]
id = "sg-open"
ingress = [{ protocol = "udp", ports = "0-65535", from = ["0.0.0.0/0"] }]
egress = [{ protocol = "udp", ports = "0-65535", to = ["0.0.0.0/0"] }]
"#;
    fixtures::state(&text)
}

fn boot_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn signature(v: &(bool, Vec<Effect>)) -> String {
    let mut s = format!("{}", v.0);
    for e in &v.1 {
        s += &match e {
            Effect::Put(_, f) => format!(" put:{:?}", f.tcp),
            Effect::Remove(_) => " remove".into(),
            Effect::Remember(_, secs) => format!(" remember:{secs}"),
        };
    }
    s
}

/// Runs `frames` frames from `seed` through the real programs and the model; panics on
/// the first disagreement, naming the seed, the frame and both verdicts.
pub fn campaign(frames: u64, seed: u64) -> Report {
    let state = fuzz_state();
    let sizes = sg_agent::datapath::MapSizes {
        conntrack: 262_144,
        conntrack_new: 262_144,
        fragments: 16_384,
        ..fixtures::sizes()
    };
    let mut bpf = Bpf::load(&sizes);
    bpf.program(
        &state,
        &[LocalInterface {
            ifindex: LO,
            eni: "eni-main".into(),
        }],
        &Options::default(),
    );
    let mut model = Model {
        state,
        flows: HashMap::new(),
        frags: HashMap::new(),
    };
    let mut rng = Rng::new(seed);
    let mut report = Report::default();
    let mut conversations: Vec<Conversation> = Vec::new();
    let mut virtual_ns = boot_ns();
    let global: GlobalConfig = bpf.dp.global().expect("global config");
    let mut sent = 0u64;
    while report.frames < frames {
        sent += 1;
        if conversations.len() < 48 || rng.chance(2) {
            if conversations.len() >= 48 {
                let i = rng.below(conversations.len() as u64) as usize;
                conversations.swap_remove(i);
            }
            conversations.push(Conversation::new(&mut rng));
        }
        let i = rng.below(conversations.len() as u64) as usize;
        let (dir, mut spec, raw) = match rng.below(100) {
            // An ICMP error about one of the conversation's frames, to either end.
            0..=3 => {
                let (d, mut about) = conversations[i].next_frame(&mut rng);
                // Quoting extension headers and fragments too (path-MTU discovery).
                if rng.chance(30) {
                    mutate_spec(&mut about, &mut rng);
                }
                let (src, dst) = match (d, rng.chance(80)) {
                    (_, true) => (about.dst.to_string(), about.src.to_string()),
                    (_, false) => (about.dst.to_string(), conversations[i].remote.to_string()),
                };
                let (t, c) = if about.src.is_ipv6() {
                    (*rng.pick(&[1u8, 2, 3, 4, 128]), 0)
                } else {
                    (*rng.pick(&[3u8, 11, 12, 0]), 4)
                };
                (d.flip(), icmp_error(&src, &dst, t, c, &about), false)
            }
            // Random bytes.
            4 => (
                if rng.chance(50) { Dir::In } else { Dir::Out },
                tcp(ME4, "198.18.1.1", 1, 1, 0),
                true,
            ),
            _ => {
                let (d, s) = conversations[i].next_frame(&mut rng);
                (d, s, false)
            }
        };
        let mutated = rng.chance(25);
        if mutated {
            mutate_spec(&mut spec, &mut rng);
        }
        let mut frame = if raw {
            (0..rng.below(100))
                .map(|_| rng.next_u64() as u8)
                .collect::<Vec<u8>>()
        } else {
            spec.build()
        };
        if mutated && rng.chance(40) {
            mutate_bytes(&mut frame, &mut rng);
        }
        // Time moves: mostly milliseconds, sometimes minutes, rarely days.
        virtual_ns += match rng.below(1000) {
            0 => 6 * 86_400_000_000_000,
            1..=15 => rng.below(200_000_000_000),
            _ => rng.below(50_000_000),
        };
        let hook = match dir {
            Dir::Out => Hook::TcEgress,
            Dir::In if rng.chance(50) => Hook::Xdp,
            Dir::In => Hook::TcIngress,
        };
        // The model's verdict must not depend on the few microseconds between the
        // kernel's clock and ours: away from every boundary, or time moves on a little.
        let mut verdict = model.judge(&frame, dir, virtual_ns);
        for _ in 0..4 {
            let later = model.judge(&frame, dir, virtual_ns + 2_000_000);
            if signature(&later) == signature(&verdict) {
                break;
            }
            virtual_ns += 5_000_000;
            verdict = model.judge(&frame, dir, virtual_ns);
        }
        bpf.dp
            .set_global(GlobalConfig {
                clock_offset_ns: virtual_ns.wrapping_sub(boot_ns()),
                ..global
            })
            .expect("clock");
        let got = match bpf.try_run_raw(hook, LO, &frame, 1) {
            Ok((pass, _)) => pass,
            Err(_) => {
                report.refused += 1;
                continue;
            }
        };
        if got != verdict.0 {
            panic!(
                "fuzz: seed {seed}, frame {sent} via {hook:?} ({dir:?}): kernel {}, model {} ({})\nframe: {}\nparsed: {:?}\nspec: {spec:?}",
                if got { "pass" } else { "drop" },
                if verdict.0 { "pass" } else { "drop" },
                signature(&verdict),
                frame.iter().map(|b| format!("{b:02x}")).collect::<String>(),
                parse(&frame),
            );
        }
        model.apply(verdict.1);
        report.frames += 1;
        report.mutated += mutated as u64;
        if got {
            report.passed += 1;
        } else {
            report.dropped += 1;
        }
    }
    report
}
