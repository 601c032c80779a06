//! Packet parsing: Ethernet (two VLAN tags), IPv4 with options, IPv6 with extension
//! headers, fragments, and the L4 fields policy and conntrack need. Anything that cannot
//! be parsed with certainty is an error with a drop reason; fail closed.

use core::mem::size_of;

use aya_ebpf::{
    helpers::generated::bpf_xdp_get_buff_len,
    programs::{TcContext, XdpContext},
};
use sg_common::{ct, drop_reason as dr, *};

/// A packet buffer: XDP or TC.
pub trait Frame {
    fn start(&self) -> usize;
    fn end(&self) -> usize;
    /// Length of the whole frame, including data outside the directly readable part.
    fn wire_len(&self) -> u32;
    fn ifindex(&self) -> u32;
}

/// The one bounds check: a pointer to a `T` at `off`, or `Err` when it is not all inside
/// the readable part of the frame.
#[inline(always)]
pub fn ptr_at<T>(f: &impl Frame, off: usize) -> Result<*const T, ()> {
    let start = f.start();
    if start + off + size_of::<T>() > f.end() {
        return Err(());
    }
    Ok((start + off) as *const T)
}

/// An XDP buffer as a `Frame`.
pub struct XdpFrame<'a>(pub &'a XdpContext);
impl Frame for XdpFrame<'_> {
    #[inline(always)]
    fn start(&self) -> usize {
        self.0.data()
    }
    #[inline(always)]
    fn end(&self) -> usize {
        self.0.data_end()
    }
    #[inline(always)]
    fn wire_len(&self) -> u32 {
        // SAFETY: helper on the program's own context.
        unsafe { bpf_xdp_get_buff_len(self.0.ctx) as u32 }
    }
    #[inline(always)]
    fn ifindex(&self) -> u32 {
        self.0.ingress_ifindex() as u32
    }
}

/// A TC skb as a `Frame`.
pub struct TcFrame<'a>(pub &'a TcContext);
impl Frame for TcFrame<'_> {
    #[inline(always)]
    fn start(&self) -> usize {
        self.0.data()
    }
    #[inline(always)]
    fn end(&self) -> usize {
        self.0.data_end()
    }
    #[inline(always)]
    fn wire_len(&self) -> u32 {
        self.0.len()
    }
    #[inline(always)]
    fn ifindex(&self) -> u32 {
        // SAFETY: reading a field of the program's own context.
        unsafe { (*self.0.skb.skb).ifindex }
    }
}

#[inline(always)]
fn read<T: Copy>(f: &impl Frame, off: usize, reason: u32) -> Result<T, u32> {
    let p = ptr_at::<T>(f, off).map_err(|_| reason)?;
    // SAFETY: `ptr_at` checked that `size_of::<T>()` bytes at `p` are in the frame, and `T`
    // is a byte array (alignment 1).
    Ok(unsafe { core::ptr::read_unaligned(p) })
}

#[inline(always)]
fn be16(b: [u8; 2]) -> u16 {
    u16::from_be_bytes(b)
}

pub const FRAG_NONE: u8 = 0;
pub const FRAG_FIRST: u8 = 1;
pub const FRAG_LATER: u8 = 2;

/// What the datapath knows about an IP packet.
#[derive(Clone, Copy, Default)]
pub struct Ip {
    pub family: u8,
    pub protocol: u8,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub l4: L4,
    pub frag: u8,
    pub frag_id: u32,
    /// Offset of the L4 header.
    pub l4_off: usize,
    /// Bytes from the Ethernet header to the end of the IP packet (for flow accounting).
    pub len: u32,
    /// IPv4 TTL or IPv6 hop limit.
    pub hop_limit: u8,
}

/// L4 fields. Ports are host order. For ICMP, `sport` is the echo identifier.
#[derive(Clone, Copy, Default)]
pub struct L4 {
    pub sport: u16,
    pub dport: u16,
    pub tcp_flags: u8,
    pub icmp_type: u8,
    pub icmp_code: u8,
    pub tcp_win: u16,
    pub tcp_seq: u32,
    pub tcp_ack: u32,
    /// TCP: payload bytes, plus one each for SYN and FIN.
    pub tcp_len: u32,
}

use ethertype::{
    ARP as ETH_P_ARP, IPV4 as ETH_P_IP, IPV6 as ETH_P_IPV6, QINQ as ETH_P_8021AD,
    VLAN as ETH_P_8021Q,
};

/// What `parse_into` found besides an IP packet.
pub const PARSED_IP: i32 = 0;
pub const PARSED_NOT_IP: i32 = -1;
pub const PARSED_ARP: i32 = -2;

/// Parses the frame from the Ethernet header on, into `ip` (written in place: the header
/// walk keeps few values live). A function of its own (a BPF-to-BPF call), for the
/// programs' one call: its registers spill into its own frame, which is gone before the
/// policy path runs. Returns `PARSED_*` or a drop reason.
#[inline(never)]
pub fn parse_into(f: &impl Frame, ip: &mut Ip) -> i32 {
    match parse(f, ip) {
        Ok(code) => code,
        Err(reason) => reason as i32,
    }
}

#[inline(always)]
fn parse(f: &impl Frame, ip: &mut Ip) -> Result<i32, u32> {
    let mut proto = be16(read::<[u8; 2]>(f, 12, dr::TRUNCATED_ETHERNET)?);
    let mut off = 14usize;
    // Up to two VLAN tags (802.1ad outer, 802.1Q inner).
    if proto == ETH_P_8021Q || proto == ETH_P_8021AD {
        proto = be16(read::<[u8; 2]>(f, off + 2, dr::TRUNCATED_ETHERNET)?);
        off += 4;
        if proto == ETH_P_8021Q || proto == ETH_P_8021AD {
            proto = be16(read::<[u8; 2]>(f, off + 2, dr::TRUNCATED_ETHERNET)?);
            off += 4;
            if proto == ETH_P_8021Q || proto == ETH_P_8021AD {
                return Err(dr::VLAN_TOO_DEEP);
            }
        }
    }
    match proto {
        ETH_P_IP => parse_ipv4(f, off, ip).map(|_| PARSED_IP),
        ETH_P_IPV6 => parse_ipv6(f, off, ip).map(|_| PARSED_IP),
        ETH_P_ARP => Ok(PARSED_ARP),
        _ => Ok(PARSED_NOT_IP),
    }
}

#[inline(always)]
fn parse_ipv4(f: &impl Frame, off: usize, ip: &mut Ip) -> Result<(), u32> {
    let h = read::<[u8; 20]>(f, off, dr::TRUNCATED_IP)?;
    if h[0] >> 4 != 4 {
        return Err(dr::BAD_IP_VERSION);
    }
    let ihl = ((h[0] & 0x0f) as usize) * 4;
    if ihl < 20 {
        return Err(dr::BAD_IHL);
    }
    let mut total = be16([h[2], h[3]]) as usize;
    // The frame's full length costs a helper call in XDP: ask only when the packet does
    // not fit in the directly readable part.
    let linear = f.end() - f.start();
    if total == 0 {
        // IPv4 BIG TCP: a GSO packet over 64 KiB carries total length 0 and its real
        // length in the skb (Linux 6.3+); only such a packet may.
        let wire = (f.wire_len() as usize).saturating_sub(off);
        if wire > 0xffff {
            total = wire;
        }
    }
    let fits = off + total <= linear;
    if total < ihl || (!fits && total > (f.wire_len() as usize).saturating_sub(off)) {
        return Err(dr::BAD_LENGTH);
    }
    let frag_field = be16([h[6], h[7]]);
    let frag = if frag_field & 0x1fff != 0 {
        FRAG_LATER
    } else if frag_field & 0x2000 != 0 {
        FRAG_FIRST
    } else {
        FRAG_NONE
    };
    ip.family = FAMILY_V4;
    ip.protocol = h[9];
    ip.frag = frag;
    ip.frag_id = be16([h[4], h[5]]) as u32;
    ip.l4_off = off + ihl;
    ip.len = (off + total) as u32;
    ip.hop_limit = h[8];
    ip.src[..4].copy_from_slice(&h[12..16]);
    ip.dst[..4].copy_from_slice(&h[16..20]);
    // Options must be present in full.
    if ihl > 20 {
        read::<[u8; 1]>(f, off + ihl - 1, dr::TRUNCATED_IP)?;
    }
    if frag != FRAG_LATER {
        parse_l4(f, ip.protocol, ip.l4_off, ip.len as usize, &mut ip.l4)?;
    }
    Ok(())
}

const NEXTHDR_HOP: u8 = 0;
/// Steps of the walk of the packet an ICMPv6 error quotes: three extension headers at
/// most, then its L4 header (the verifier's budget sets the bound).
const QUOTED_EXT_LIMIT: usize = 4;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_AUTH: u8 = 51;
const NEXTHDR_DEST: u8 = 60;

#[inline(always)]
fn parse_ipv6(f: &impl Frame, off: usize, ip: &mut Ip) -> Result<(), u32> {
    let h = read::<[u8; 40]>(f, off, dr::TRUNCATED_IP)?;
    if h[0] >> 4 != 6 {
        return Err(dr::BAD_IP_VERSION);
    }
    let payload = be16([h[4], h[5]]) as usize;
    let linear = f.end() - f.start();
    let fits = off + 40 + payload <= linear;
    // A zero payload length with a hop-by-hop header is a jumbogram (RFC 2675).
    if (!fits && payload > (f.wire_len() as usize).saturating_sub(off + 40))
        || (payload == 0 && h[6] != NEXTHDR_HOP && h[6] != 59)
    {
        return Err(dr::BAD_LENGTH);
    }
    ip.family = FAMILY_V6;
    ip.protocol = h[6];
    ip.frag = FRAG_NONE;
    ip.frag_id = 0;
    ip.l4_off = off + 40;
    ip.len = (off + 40 + payload) as u32;
    ip.hop_limit = h[7];
    ip.src.copy_from_slice(&h[8..24]);
    ip.dst.copy_from_slice(&h[24..40]);
    let mut next = ip.protocol;
    let mut pos = off + 40;
    let mut walked = 0usize;
    let mut seen_fragment = false;
    while walked < IPV6_EXT_WALK_LIMIT {
        match next {
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST => {
                let e = read::<[u8; 2]>(f, pos, dr::TRUNCATED_IP)?;
                next = e[0];
                pos += (e[1] as usize + 1) * 8;
            }
            NEXTHDR_AUTH => {
                let e = read::<[u8; 2]>(f, pos, dr::TRUNCATED_IP)?;
                next = e[0];
                pos += (e[1] as usize + 2) * 4;
            }
            NEXTHDR_FRAGMENT => {
                if seen_fragment {
                    return Err(dr::FRAGMENT_HEADER_TWICE);
                }
                seen_fragment = true;
                let e = read::<[u8; 8]>(f, pos, dr::TRUNCATED_IP)?;
                next = e[0];
                let frag_field = be16([e[2], e[3]]);
                ip.frag = if frag_field & 0xfff8 != 0 {
                    FRAG_LATER
                } else if frag_field & 1 != 0 {
                    FRAG_FIRST
                } else {
                    FRAG_NONE
                };
                ip.frag_id = u32::from_be_bytes([e[4], e[5], e[6], e[7]]);
                pos += 8;
                // After a non-first fragment's header comes its payload: never headers.
                if ip.frag == FRAG_LATER {
                    break;
                }
            }
            _ => break,
        }
        walked += 1;
    }
    if ip.frag != FRAG_LATER
        && matches!(
            next,
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST | NEXTHDR_AUTH | NEXTHDR_FRAGMENT
        )
    {
        return Err(dr::EXT_CHAIN_TOO_LONG);
    }
    // Keep the offset provably small for the verifier (the walk adds at most ~12 KiB).
    if pos > 0x3fff {
        return Err(dr::TRUNCATED_IP);
    }
    ip.protocol = next;
    ip.l4_off = pos & 0x3fff;
    if ip.frag != FRAG_LATER {
        parse_l4(f, ip.protocol, ip.l4_off, ip.len as usize, &mut ip.l4)?;
    }
    Ok(())
}

/// The L4 fields at `off`; the header must lie wholly inside the IP packet, which ends
/// at `end` (bytes past the IP length are never read as headers, SPEC §2; a first
/// fragment too short for the whole TCP header is dropped, RFC 1858).
#[inline(always)]
fn parse_l4(f: &impl Frame, protocol: u8, off: usize, end: usize, l4: &mut L4) -> Result<(), u32> {
    let fits = |size: usize| {
        if off + size <= end {
            Ok(())
        } else {
            Err(dr::TRUNCATED_L4)
        }
    };
    match protocol {
        PROTO_TCP => {
            fits(20)?;
            let t = read::<[u8; 20]>(f, off, dr::TRUNCATED_L4)?;
            l4.sport = be16([t[0], t[1]]);
            l4.dport = be16([t[2], t[3]]);
            let doff = (t[12] >> 4) as usize;
            if doff < 5 {
                return Err(dr::TRUNCATED_L4);
            }
            fits(doff * 4)?;
            l4.tcp_flags = t[13];
            l4.tcp_seq = u32::from_be_bytes([t[4], t[5], t[6], t[7]]);
            l4.tcp_ack = u32::from_be_bytes([t[8], t[9], t[10], t[11]]);
            l4.tcp_win = be16([t[14], t[15]]);
            let flags = t[13];
            let payload = end.saturating_sub(off + doff * 4) as u32;
            l4.tcp_len =
                payload + (flags & ct::TH_SYN != 0) as u32 + (flags & ct::TH_FIN != 0) as u32;
        }
        PROTO_UDP => {
            fits(8)?;
            let u = read::<[u8; 8]>(f, off, dr::TRUNCATED_L4)?;
            l4.sport = be16([u[0], u[1]]);
            l4.dport = be16([u[2], u[3]]);
        }
        PROTO_ICMP | PROTO_ICMPV6 => {
            fits(8)?;
            let i = read::<[u8; 8]>(f, off, dr::TRUNCATED_L4)?;
            l4.icmp_type = i[0];
            l4.icmp_code = i[1];
            l4.sport = be16([i[4], i[5]]);
        }
        _ => {}
    }
    Ok(())
}

/// Whether an ICMP message is an error that carries the header of the packet it is about.
#[inline(always)]
pub fn is_icmp_error(family: u8, protocol: u8, icmp_type: u8) -> bool {
    match (family, protocol) {
        (FAMILY_V4, PROTO_ICMP) => matches!(icmp_type, 3 | 11 | 12),
        (FAMILY_V6, PROTO_ICMPV6) => matches!(icmp_type, 1..=4),
        _ => false,
    }
}

/// The header embedded in an ICMP error: the packet that caused it, as it was sent.
#[inline(always)]
pub fn parse_embedded(f: &impl Frame, outer: &Ip) -> Result<Ip, u32> {
    let off = outer.l4_off + 8;
    let mut ip = Ip {
        family: outer.family,
        protocol: 0,
        src: [0; 16],
        dst: [0; 16],
        l4: L4::default(),
        frag: FRAG_NONE,
        frag_id: 0,
        l4_off: 0,
        len: 0,
        hop_limit: 0,
    };
    if outer.family == FAMILY_V4 {
        let h = read::<[u8; 20]>(f, off, dr::TRUNCATED_L4)?;
        let ihl = ((h[0] & 0x0f) as usize) * 4;
        if h[0] >> 4 != 4 || ihl < 20 {
            return Err(dr::BAD_IHL);
        }
        ip.protocol = h[9];
        ip.src[..4].copy_from_slice(&h[12..16]);
        ip.dst[..4].copy_from_slice(&h[16..20]);
        ip.l4_off = off + ihl;
    } else {
        let h = read::<[u8; 40]>(f, off, dr::TRUNCATED_L4)?;
        ip.src.copy_from_slice(&h[8..24]);
        ip.dst.copy_from_slice(&h[24..40]);
        // The quoted packet's extension headers are walked to its L4 header (SPEC §1.4).
        let walked = quoted_l4(f, off + 40, h[6]);
        if walked == u32::MAX {
            return Err(dr::EXT_CHAIN_TOO_LONG);
        }
        ip.protocol = walked as u8;
        ip.l4_off = (walked >> 8) as usize & 0x3fff;
    }
    // The error quotes at least the first 8 bytes of the L4 header: ports or echo id.
    let q = read::<[u8; 8]>(f, ip.l4_off, dr::TRUNCATED_L4)?;
    match ip.protocol {
        PROTO_TCP | PROTO_UDP => {
            ip.l4.sport = be16([q[0], q[1]]);
            ip.l4.dport = be16([q[2], q[3]]);
        }
        PROTO_ICMP | PROTO_ICMPV6 => {
            ip.l4.icmp_type = q[0];
            ip.l4.icmp_code = q[1];
            ip.l4.sport = be16([q[4], q[5]]);
        }
        _ => {}
    }
    Ok(ip)
}

/// The L4 header of a packet an ICMPv6 error quotes, whose extension headers start at
/// `pos` with `next`: `offset << 8 | protocol`, or `u32::MAX` when the chain is longer
/// than the walk, cut short, or a non-first fragment's (which quotes no L4 header and so
/// names no flow). Path-MTU discovery for fragmented UDP quotes a fragment header. A
/// function of its own (a BPF-to-BPF call) so that its loop's registers stay out of the
/// caller's frame.
#[inline(never)]
fn quoted_l4(f: &impl Frame, from: usize, first: u8) -> u32 {
    let (mut next, mut pos) = (first, from);
    for _ in 0..QUOTED_EXT_LIMIT {
        let at = pos & 0x3fff;
        match next {
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST | NEXTHDR_AUTH => {
                let Ok(e) = read::<[u8; 2]>(f, at, 0) else {
                    return u32::MAX;
                };
                let unit = if next == NEXTHDR_AUTH {
                    (e[1] as usize + 2) * 4
                } else {
                    (e[1] as usize + 1) * 8
                };
                next = e[0];
                pos = at + unit;
            }
            NEXTHDR_FRAGMENT => {
                let Ok(e) = read::<[u8; 4]>(f, at, 0) else {
                    return u32::MAX;
                };
                if be16([e[2], e[3]]) & 0xfff8 != 0 {
                    return u32::MAX;
                }
                next = e[0];
                pos = at + 8;
            }
            _ => return ((pos & 0x3fff) as u32) << 8 | next as u32,
        }
    }
    u32::MAX
}

/// Infrastructure traffic that security groups never filter (SPEC §1.12), and only as
/// wide as the link: IPv6 neighbour and router discovery with hop limit 255 (RFC 4861: it
/// never crossed a router), MLD from a link-local (or unspecified) source with hop limit
/// 1, DHCPv4 client requests to the broadcast or a link-local address and server replies,
/// DHCPv6 to link-local addresses and the DHCPv6 multicast groups. The same types or ports
/// outside this scope are ordinary packets.
#[inline(always)]
pub fn is_infrastructure(ip: &Ip) -> bool {
    if ip.frag != FRAG_NONE {
        return false;
    }
    let link_local_v6 = |a: &[u8; 16]| a[0] == 0xfe && a[1] & 0xc0 == 0x80;
    match (ip.family, ip.protocol) {
        (FAMILY_V6, PROTO_ICMPV6) => match ip.l4.icmp_type {
            133..=137 => ip.hop_limit == 255,
            130..=132 | 143 => ip.hop_limit == 1 && (link_local_v6(&ip.src) || ip.src == [0; 16]),
            _ => false,
        },
        (FAMILY_V4, PROTO_UDP) => match (ip.l4.sport, ip.l4.dport) {
            (68, 67) => {
                let d = &ip.dst;
                d[..4] == [255, 255, 255, 255] || (d[0] == 169 && d[1] == 254)
            }
            (67, 68) => true,
            _ => false,
        },
        (FAMILY_V6, PROTO_UDP) => {
            let d = &ip.dst;
            // ff02::1:2 (all relay agents and servers), ff05::1:3 (all servers).
            let dhcp_group = (d[0] == 0xff && (d[1] == 0x02 || d[1] == 0x05))
                && d[2..13] == [0; 11]
                && d[13] == 1
                && d[14] == 0
                && (d[15] == 2 || d[15] == 3);
            match (ip.l4.sport, ip.l4.dport) {
                (546, 547) => link_local_v6(d) || dhcp_group,
                (547, 546) => link_local_v6(d),
                _ => false,
            }
        }
        _ => false,
    }
}

/// Bytes from the start of the frame that parsing needs: Ethernet and VLAN tags, the
/// IP header (IPv4 by its IHL; IPv6 with room for extension headers) and the L4 header
/// (room for an ICMP error's quoted packet). Generous when unsure; read from the linear
/// part, so a frame whose very first headers are not linear gets a full pull.
#[inline(always)]
pub fn headers_len(f: &impl Frame) -> u32 {
    const FALLBACK: u32 = 256;
    let Ok(p) = ptr_at::<[u8; 2]>(f, 12) else {
        return FALLBACK;
    };
    // SAFETY: bounds checked by ptr_at.
    let mut proto = u16::from_be_bytes(unsafe { *p });
    let mut off = 14u32;
    let mut tags = 0;
    while (proto == ethertype::VLAN || proto == ethertype::QINQ) && tags < 2 {
        let Ok(p) = ptr_at::<[u8; 2]>(f, off as usize + 2) else {
            return FALLBACK;
        };
        // SAFETY: bounds checked by ptr_at.
        proto = u16::from_be_bytes(unsafe { *p });
        off += 4;
        tags += 1;
    }
    match proto {
        0x0800 => {
            let Ok(p) = ptr_at::<[u8; 20]>(f, off as usize) else {
                return FALLBACK;
            };
            // SAFETY: bounds checked by ptr_at.
            let h = unsafe { *p };
            let ihl = ((h[0] & 0x0f) as u32) * 4;
            let l4 = match h[9] {
                PROTO_ICMP => 8 + 60 + 8,
                _ => 20,
            };
            off + ihl + l4
        }
        0x86dd => {
            let Ok(p) = ptr_at::<[u8; 8]>(f, off as usize) else {
                return FALLBACK;
            };
            // SAFETY: bounds checked by ptr_at.
            let next = unsafe { *p }[6];
            let l4 = match next {
                PROTO_TCP => 20,
                PROTO_UDP => 8,
                PROTO_ICMPV6 => 8 + 40 + 8,
                // Extension headers: room for a few.
                _ => 128,
            };
            off + 40 + l4
        }
        _ => off,
    }
}
