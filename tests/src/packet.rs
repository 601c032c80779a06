//! Crafted Ethernet frames, byte by byte, so that malformed ones are as easy to make as
//! good ones. Checksums are left zero: the datapath does not verify them.

use std::net::IpAddr;

pub const TH_FIN: u8 = 0x01;
pub const TH_SYN: u8 = 0x02;
pub const TH_RST: u8 = 0x04;
pub const TH_ACK: u8 = 0x10;

#[derive(Clone, Debug)]
pub enum L4 {
    /// Sequence number 1 and acknowledgement 0 unless `Spec::seq` says otherwise.
    Tcp {
        sport: u16,
        dport: u16,
        flags: u8,
        seq: u32,
        ack: u32,
    },
    Udp {
        sport: u16,
        dport: u16,
    },
    /// ICMP or ICMPv6 (by address family); `rest` is the 4 bytes after the checksum
    /// (identifier and sequence for echo), `body` what follows (an embedded packet).
    Icmp {
        icmp_type: u8,
        code: u8,
        rest: [u8; 4],
        body: Vec<u8>,
    },
    /// Any other protocol, with `len` bytes of payload.
    Other {
        protocol: u8,
        len: usize,
    },
    /// A non-first fragment: raw payload only.
    FragmentData {
        protocol: u8,
        len: usize,
    },
    /// Exactly these L4 bytes under this protocol number.
    Raw {
        protocol: u8,
        bytes: Vec<u8>,
    },
}

/// Everything about a frame.
#[derive(Clone, Debug)]
pub struct Spec {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub l4: L4,
    pub payload: usize,
    /// VLAN ids, outer first (at most two make sense; more are malformed).
    pub vlans: Vec<u16>,
    /// IPv4 options bytes (a multiple of 4, at most 40).
    pub ipv4_options: usize,
    /// IPv6 extension headers by type (0, 43, 60, 51), before any fragment header.
    pub ipv6_ext: Vec<u8>,
    /// (identification, offset in bytes, more fragments).
    pub fragment: Option<(u32, u16, bool)>,
    /// IPv4 TTL or IPv6 hop limit.
    pub hop_limit: u8,
}

impl Spec {
    pub fn new(src: &str, dst: &str, l4: L4) -> Spec {
        Spec {
            src: src.parse().expect("src address"),
            dst: dst.parse().expect("dst address"),
            l4,
            payload: 0,
            vlans: vec![],
            ipv4_options: 0,
            ipv6_ext: vec![],
            fragment: None,
            hop_limit: 64,
        }
    }

    /// A TCP segment's sequence and acknowledgement numbers.
    pub fn seq(mut self, seq_no: u32, ack_no: u32) -> Spec {
        if let L4::Tcp { seq, ack, .. } = &mut self.l4 {
            (*seq, *ack) = (seq_no, ack_no);
        }
        self
    }

    pub fn build(&self) -> Vec<u8> {
        let mut f = Vec::with_capacity(128);
        f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01]);
        for (i, vid) in self.vlans.iter().enumerate() {
            let tpid: u16 = if i == 0 && self.vlans.len() > 1 {
                0x88a8
            } else {
                0x8100
            };
            f.extend_from_slice(&tpid.to_be_bytes());
            f.extend_from_slice(&vid.to_be_bytes());
        }
        let v6 = self.src.is_ipv6();
        f.extend_from_slice(&(if v6 { 0x86ddu16 } else { 0x0800 }).to_be_bytes());
        let (protocol, l4) = self.l4_bytes(v6);
        if v6 {
            f.extend(ipv6(self, protocol, &l4));
        } else {
            f.extend(ipv4(self, protocol, &l4));
        }
        f
    }

    fn l4_bytes(&self, v6: bool) -> (u8, Vec<u8>) {
        let pad = vec![0xabu8; self.payload];
        match &self.l4 {
            L4::Tcp {
                sport,
                dport,
                flags,
                seq,
                ack,
            } => {
                let mut h = Vec::new();
                h.extend_from_slice(&sport.to_be_bytes());
                h.extend_from_slice(&dport.to_be_bytes());
                h.extend_from_slice(&seq.to_be_bytes());
                h.extend_from_slice(&ack.to_be_bytes());
                h.extend_from_slice(&[0x50, *flags, 0xff, 0xff, 0, 0, 0, 0]);
                h.extend(pad);
                (6, h)
            }
            L4::Udp { sport, dport } => {
                let mut h = Vec::new();
                h.extend_from_slice(&sport.to_be_bytes());
                h.extend_from_slice(&dport.to_be_bytes());
                h.extend_from_slice(&((8 + self.payload) as u16).to_be_bytes());
                h.extend_from_slice(&[0, 0]);
                h.extend(pad);
                (17, h)
            }
            L4::Icmp {
                icmp_type,
                code,
                rest,
                body,
            } => {
                let mut h = vec![*icmp_type, *code, 0, 0];
                h.extend_from_slice(rest);
                h.extend_from_slice(body);
                h.extend(pad);
                (if v6 { 58 } else { 1 }, h)
            }
            L4::Other { protocol, len } | L4::FragmentData { protocol, len } => {
                (*protocol, vec![0x11; *len])
            }
            L4::Raw { protocol, bytes } => (*protocol, bytes.clone()),
        }
    }
}

fn addr_bytes(a: &IpAddr) -> Vec<u8> {
    match a {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// An IPv4 packet (no Ethernet header).
pub fn ipv4(s: &Spec, protocol: u8, l4: &[u8]) -> Vec<u8> {
    let ihl = 20 + s.ipv4_options;
    let mut h = vec![0x40 | (ihl / 4) as u8, 0];
    h.extend_from_slice(&((ihl + l4.len()) as u16).to_be_bytes());
    let (id, offset, more) = s.fragment.unwrap_or((0x1234, 0, false));
    h.extend_from_slice(&(id as u16).to_be_bytes());
    let frag = (offset / 8) | if more { 0x2000 } else { 0 };
    h.extend_from_slice(&frag.to_be_bytes());
    h.extend_from_slice(&[s.hop_limit, protocol, 0, 0]);
    h.extend(addr_bytes(&s.src));
    h.extend(addr_bytes(&s.dst));
    h.extend(std::iter::repeat_n(1u8, s.ipv4_options)); // NOP options
    h.extend_from_slice(l4);
    h
}

/// An IPv6 packet (no Ethernet header), with extension headers and fragment header.
pub fn ipv6(s: &Spec, protocol: u8, l4: &[u8]) -> Vec<u8> {
    let mut chain: Vec<u8> = s.ipv6_ext.clone();
    if s.fragment.is_some() {
        chain.push(44);
    }
    let mut ext = Vec::new();
    for (i, kind) in chain.iter().enumerate() {
        let next = chain.get(i + 1).copied().unwrap_or(protocol);
        match *kind {
            44 => {
                let (id, offset, more) = s.fragment.unwrap_or_default();
                ext.extend_from_slice(&[next, 0]);
                ext.extend_from_slice(&((offset & !7) | more as u16).to_be_bytes());
                ext.extend_from_slice(&id.to_be_bytes());
            }
            51 => ext.extend_from_slice(&[next, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
            _ => ext.extend_from_slice(&[next, 0, 1, 4, 0, 0, 0, 0]),
        }
    }
    let first = chain.first().copied().unwrap_or(protocol);
    let mut h = vec![0x60, 0, 0, 0];
    h.extend_from_slice(&((ext.len() + l4.len()) as u16).to_be_bytes());
    h.extend_from_slice(&[first, s.hop_limit]);
    h.extend(addr_bytes(&s.src));
    h.extend(addr_bytes(&s.dst));
    h.extend(ext);
    h.extend_from_slice(l4);
    h
}

pub fn tcp(src: &str, dst: &str, sport: u16, dport: u16, flags: u8) -> Spec {
    Spec::new(
        src,
        dst,
        L4::Tcp {
            sport,
            dport,
            flags,
            seq: 1,
            ack: 0,
        },
    )
}

pub fn udp(src: &str, dst: &str, sport: u16, dport: u16) -> Spec {
    Spec::new(src, dst, L4::Udp { sport, dport })
}

/// ICMP/ICMPv6 by family of the addresses, with identifier in `rest`.
pub fn icmp(src: &str, dst: &str, icmp_type: u8, code: u8, id: u16) -> Spec {
    let b = id.to_be_bytes();
    Spec::new(
        src,
        dst,
        L4::Icmp {
            icmp_type,
            code,
            rest: [b[0], b[1], 0, 1],
            body: vec![],
        },
    )
}

/// An ICMP error (`icmp_type`/`code`) from `src` to `dst` quoting `about` (an IP packet as
/// sent, without its Ethernet header; at least its first 8 L4 bytes are quoted).
pub fn icmp_error(src: &str, dst: &str, icmp_type: u8, code: u8, about: &Spec) -> Spec {
    let frame = about.build();
    let quoted = frame[14 + 4 * about.vlans.len()..].to_vec();
    // ICMPv6 quotes as much as fits in the minimum MTU (RFC 4443), extension headers
    // included; ICMP the IP header and 8 bytes (RFC 792).
    let cut = quoted
        .len()
        .min(if about.src.is_ipv6() { 1232 } else { 20 + 8 });
    Spec::new(
        src,
        dst,
        L4::Icmp {
            icmp_type,
            code,
            rest: [0, 0, 5, 0xdc],
            body: quoted[..cut].to_vec(),
        },
    )
}

/// An ARP request frame.
pub fn arp() -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 1, 0x08, 0x06]);
    f.extend_from_slice(&[
        0, 1, 8, 0, 6, 4, 0, 1, 2, 0, 0, 0, 0, 1, 198, 18, 0, 1, 0, 0, 0, 0, 0, 0, 198, 18, 0, 2,
    ]);
    f
}

/// A frame with an arbitrary EtherType and a small payload.
pub fn ethertype(t: u16) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1];
    f.extend_from_slice(&t.to_be_bytes());
    f.extend_from_slice(&[0u8; 46]);
    f
}

/// Fills in valid IPv4 header and TCP/UDP checksums of an untagged Ethernet/IPv4 frame
/// (for traffic that a real stack will receive).
pub fn fix_ipv4_checksums(frame: &mut [u8]) {
    fn fold(mut sum: u32) -> u16 {
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }
    fn add(bytes: &[u8]) -> u32 {
        bytes
            .chunks(2)
            .map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32)
            .sum()
    }
    let ihl = ((frame[14] & 0x0f) as usize) * 4;
    frame[24] = 0;
    frame[25] = 0;
    let c = fold(add(&frame[14..14 + ihl]));
    frame[24..26].copy_from_slice(&c.to_be_bytes());
    let l4 = 14 + ihl;
    let total = u16::from_be_bytes([frame[16], frame[17]]) as usize;
    let len = total - ihl;
    let proto = frame[23];
    let at = match proto {
        6 => l4 + 16,
        17 => l4 + 6,
        _ => return,
    };
    frame[at] = 0;
    frame[at + 1] = 0;
    if proto == 17 {
        return; // UDP over IPv4: no checksum
    }
    let mut sum = add(&frame[26..34]) + proto as u32 + len as u32;
    sum += add(&frame[l4..l4 + len]);
    let c = fold(sum);
    frame[at..at + 2].copy_from_slice(&c.to_be_bytes());
}
