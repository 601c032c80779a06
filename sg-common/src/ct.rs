//! Connection-tracking decisions: TCP state transitions and idle-timeout choice. Pure
//! functions, unit-tested here and compiled into the kernel program.

use crate::{CtEntry, CtKey, TcpSide, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP};

// TCP states (`CtEntry::tcp_state`).
pub const TCP_NONE: u8 = 0;
pub const TCP_SYN_SENT: u8 = 1;
pub const TCP_SYN_RECV: u8 = 2;
pub const TCP_ESTABLISHED: u8 = 3;
/// One side has sent FIN.
pub const TCP_FIN_WAIT: u8 = 4;
/// Both sides have sent FIN.
pub const TCP_TIME_WAIT: u8 = 5;
/// Reset seen.
pub const TCP_CLOSE: u8 = 6;

// `CtEntry::flags`.
/// A packet was seen in the reply direction.
pub const FLAG_SEEN_REPLY: u8 = 1;
/// UDP: traffic seen in both directions more than once (stream timeout).
pub const FLAG_STREAM: u8 = 2;
pub const FLAG_FIN_ORIGIN: u8 = 4;
pub const FLAG_FIN_REPLY: u8 = 8;
/// What netfilter calls assured: TCP after a complete three-way handshake, UDP once it is
/// a stream, other protocols once a reply was seen. Only assured flows may enter the
/// established table, which new flows cannot evict (SPEC §1.11).
pub const FLAG_ASSURED: u8 = 16;

// TCP header flag bits (byte 13 of the header).
pub const TH_FIN: u8 = 0x01;
pub const TH_SYN: u8 = 0x02;
pub const TH_RST: u8 = 0x04;
pub const TH_PSH: u8 = 0x08;
pub const TH_ACK: u8 = 0x10;
pub const TH_URG: u8 = 0x20;

/// Whether a TCP flag combination is one a real stack sends, as netfilter's
/// `tcp_valid_flags` (PSH, ECE and CWR aside): SYN, SYN|ACK, RST, RST|ACK, FIN|ACK, ACK,
/// each optionally with URG (not RST). Anything else (no flag, SYN|FIN, SYN|RST, FIN
/// without ACK, …) is dropped.
#[inline(always)]
pub fn tcp_flags_valid(tcp_flags: u8) -> bool {
    let f = tcp_flags & (TH_FIN | TH_SYN | TH_RST | TH_ACK | TH_URG);
    matches!(
        f & !TH_URG,
        TH_SYN | 0x12 /* SYN|ACK */ | TH_RST | 0x14 /* RST|ACK */ | 0x11 /* FIN|ACK */ | TH_ACK
    ) && !(f & TH_URG != 0 && f & TH_RST != 0)
}

/// Whether a TCP packet may open a flow: a SYN without ACK, FIN or RST (SPEC §1.11).
#[inline(always)]
pub fn tcp_opens(tcp_flags: u8) -> bool {
    tcp_flags & (TH_SYN | TH_ACK | TH_FIN | TH_RST) == TH_SYN
}

// Timeout slots of `IfaceConfig::timeouts`.
pub const TIMEOUT_TCP_SYN_SENT: usize = 0;
pub const TIMEOUT_TCP_SYN_RECV: usize = 1;
pub const TIMEOUT_TCP_ESTABLISHED: usize = 2;
pub const TIMEOUT_TCP_CLOSING: usize = 3;
pub const TIMEOUT_TCP_CLOSE: usize = 4;
pub const TIMEOUT_UDP: usize = 5;
pub const TIMEOUT_UDP_STREAM: usize = 6;
pub const TIMEOUT_ICMP: usize = 7;
pub const TIMEOUT_OTHER: usize = 8;
pub const TIMEOUT_COUNT: usize = 9;

/// SPEC §1.11 defaults (AWS, then Linux netfilter where AWS is silent), in seconds.
pub const DEFAULT_TIMEOUTS: [u32; TIMEOUT_COUNT] = [120, 60, 432_000, 120, 10, 30, 180, 30, 600];

pub const TIMEOUT_NAMES: [&str; TIMEOUT_COUNT] = [
    "tcp_syn_sent",
    "tcp_syn_received",
    "tcp_established",
    "tcp_closing",
    "tcp_close",
    "udp",
    "udp_stream",
    "icmp",
    "other",
];

/// The next TCP state after a packet with `tcp_flags`, seen in the origin direction or not.
#[inline(always)]
pub fn tcp_next(state: u8, from_origin: bool, tcp_flags: u8, ct_flags: u8) -> (u8, u8) {
    let mut flags = ct_flags;
    if tcp_flags & TH_RST != 0 {
        return (TCP_CLOSE, flags);
    }
    if tcp_flags & TH_FIN != 0 {
        flags |= if from_origin {
            FLAG_FIN_ORIGIN
        } else {
            FLAG_FIN_REPLY
        };
    }
    let both_fin = flags & (FLAG_FIN_ORIGIN | FLAG_FIN_REPLY) == FLAG_FIN_ORIGIN | FLAG_FIN_REPLY;
    let next = match state {
        TCP_SYN_SENT => {
            // Only the reply's SYN|ACK moves the handshake on: a bare reply ACK is not an
            // answer to our SYN (netfilter ignores it too).
            if !from_origin && tcp_flags & (TH_SYN | TH_ACK) == TH_SYN | TH_ACK {
                TCP_SYN_RECV
            } else {
                TCP_SYN_SENT
            }
        }
        TCP_SYN_RECV => {
            if from_origin && tcp_flags & TH_ACK != 0 && tcp_flags & TH_SYN == 0 {
                // The three-way handshake is complete: the flow is assured.
                flags |= FLAG_ASSURED;
                TCP_ESTABLISHED
            } else {
                TCP_SYN_RECV
            }
        }
        TCP_ESTABLISHED | TCP_FIN_WAIT => {
            if both_fin {
                TCP_TIME_WAIT
            } else if flags & (FLAG_FIN_ORIGIN | FLAG_FIN_REPLY) != 0 {
                TCP_FIN_WAIT
            } else {
                TCP_ESTABLISHED
            }
        }
        other => other,
    };
    // A FIN while still in the handshake is an orderly close too.
    let next = if matches!(next, TCP_SYN_SENT | TCP_SYN_RECV) && both_fin {
        TCP_TIME_WAIT
    } else {
        next
    };
    (next, flags)
}

// `TcpSide::known`.
/// `end` holds the sender's next sequence number.
pub const SIDE_END: u8 = 1;
/// `ack` and `win` hold the sender's last acknowledgement and window.
pub const SIDE_ACK: u8 = 2;

/// What the sequence checks need of one TCP segment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Segment {
    pub flags: u8,
    pub seq: u32,
    pub ack: u32,
    pub win: u16,
    /// Payload bytes, plus one each for SYN and FIN.
    pub len: u32,
}

/// Whether a RST or FIN sent in direction `dir` has a plausible sequence number for the
/// flow (SPEC §1.11; RFC 5961 §3 as a middlebox sees it): from the other side's last
/// acknowledgement up to what the sender was seen to send, plus the window the other
/// side last advertised (unscaled: bytes sent past what this host saw, up to 64 KiB). A
/// real stack's RST carries its next sequence number, which lies in that range; a blind
/// forged one must guess it among 2³². In SYN_SENT, an answer must acknowledge the SYN
/// (RFC 793). With nothing known of the other side, only the sender's own next sequence
/// number is plausible; with nothing known of either (a flow carried over from an
/// earlier build), the segment is accepted and the flow learnt, as netfilter picks up a
/// connection.
#[inline(always)]
pub fn tcp_seq_plausible(e: &CtEntry, dir: u8, seg: &Segment) -> bool {
    let d = (dir & 1) as usize;
    let (s, r) = (&e.tcp[d], &e.tcp[d ^ 1]);
    if e.tcp_state == TCP_SYN_SENT && dir != e.origin {
        return seg.flags & TH_ACK != 0 && r.known & SIDE_END != 0 && seg.ack == r.end;
    }
    let window = (r.win as u32).max(1);
    if r.known & SIDE_ACK != 0 {
        // How far past the other side's acknowledgement the sender was seen to send.
        let sent = if s.known & SIDE_END != 0 && (s.end.wrapping_sub(r.ack) as i32) > 0 {
            s.end.wrapping_sub(r.ack)
        } else {
            0
        };
        return seg.seq.wrapping_sub(r.ack) <= sent.saturating_add(window);
    }
    if s.known & SIDE_END != 0 {
        return seg.seq == s.end;
    }
    true
}

/// Records what the sender in direction `dir` sent: its next sequence number (only ever
/// forward), and its acknowledgement and window when the acknowledgement is plausible
/// (not beyond what the other side was seen to send: a forged ACK does not move the
/// range the other side's RSTs are checked against).
#[inline(always)]
pub fn tcp_record(e: &mut CtEntry, dir: u8, seg: &Segment) {
    let d = (dir & 1) as usize;
    let (r_known, r_end) = (e.tcp[d ^ 1].known, e.tcp[d ^ 1].end);
    let s = &mut e.tcp[d];
    let end = seg.seq.wrapping_add(seg.len);
    if s.known & SIDE_END == 0 || (end.wrapping_sub(s.end) as i32) > 0 {
        s.end = end;
        s.known |= SIDE_END;
    }
    if seg.flags & TH_ACK != 0 {
        let acks_sent = r_known & SIDE_END == 0 || (r_end.wrapping_sub(seg.ack) as i32) >= 0;
        let newer = s.known & SIDE_ACK == 0 || (seg.ack.wrapping_sub(s.ack) as i32) >= 0;
        if acks_sent && newer {
            s.ack = seg.ack;
            s.win = seg.win;
            s.known |= SIDE_ACK;
        }
    }
}

/// The sequence tracking of a SYN that opens a flow in direction `dir`.
#[inline(always)]
pub fn tcp_open_sides(dir: u8, seg: &Segment) -> [TcpSide; 2] {
    let mut sides = [TcpSide::default(); 2];
    let s = &mut sides[(dir & 1) as usize];
    s.end = seg.seq.wrapping_add(seg.len);
    s.known = SIDE_END;
    sides
}

/// How many slots of `SG_CT_SLOTS` a promotion probes for a free one (from the key's
/// hash on), how many it sweeps for expired flows, and how many more when the table is
/// full (bounded by the verifier's budget).
pub const SLOT_PROBES: u32 = 4;
pub const SLOT_SWEEP_EACH: u32 = 2;
pub const SLOT_SWEEP: u32 = 8;

/// The slot of `SG_CT_SLOTS` where the probe for `key` starts.
#[inline(always)]
pub fn ct_slot_of(key: &CtKey, slots: u32) -> u32 {
    if slots == 0 {
        0
    } else {
        ct_hash(key) % slots
    }
}

/// A multiplicative hash of a flow key's words, the same in the kernel and in user space.
#[inline(always)]
pub fn ct_hash(key: &CtKey) -> u32 {
    let w = |b: &[u8], i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let mut h: u32 = 0x811c_9dc5 ^ key.ifindex;
    let mut mix = |x: u32| {
        h = (h ^ x).wrapping_mul(0x9e37_79b1).rotate_left(13);
    };
    mix(u32::from_le_bytes([
        key.family,
        key.protocol,
        key.local_port[0],
        key.local_port[1],
    ]));
    mix(u32::from_le_bytes([
        key.remote_port[0],
        key.remote_port[1],
        0,
        0,
    ]));
    for i in 0..4 {
        mix(w(&key.local, i * 4));
        mix(w(&key.remote, i * 4));
    }
    h
}

/// The flow-presence filter (`SG_CT_SEEN`): one byte per slot, in chunks of
/// `SEEN_CHUNK` bytes after a header chunk. A flow's slot (its key's hash, masked) holds
/// the epoch in which it was last stamped; the datapath stamps the slot before it inserts a
/// flow into either table, and the agent stamps every listed flow before it moves the
/// epoch on. A slot stamped in the current or the previous epoch may hold a flow; any
/// other value proves that neither table does, so a packet of no flow skips both lookups.
/// A slot is never cleared (collisions and evictions only cost a lookup), and a filter
/// that is off (`SEEN_ON` zero) answers "maybe" for every key.
pub const SEEN_CHUNK: u32 = 4096;
/// Header byte: the current epoch (1 to 255; 0 before the agent first set one).
pub const SEEN_EPOCH: usize = 0;
/// Header byte: non-zero when the datapath may trust the filter.
pub const SEEN_ON: usize = 1;
/// Header bytes 4 to 7: the slot mask (slots − 1, little-endian).
pub const SEEN_MASK: usize = 4;

/// Slots of the filter for tables of `conntrack` and `conntrack_new` flows: a power of two,
/// at least twice as many as both tables hold, at least one chunk.
pub const fn seen_slots(conntrack: u32, conntrack_new: u32) -> u32 {
    let flows = conntrack.saturating_add(conntrack_new);
    let wanted = if flows > 1 << 30 {
        1 << 31
    } else {
        (2 * flows).next_power_of_two()
    };
    if wanted < SEEN_CHUNK {
        SEEN_CHUNK
    } else {
        wanted
    }
}

/// The epoch after `e` (1 to 255, then 1 again).
#[inline(always)]
pub const fn seen_next(e: u8) -> u8 {
    if e == u8::MAX {
        1
    } else {
        e + 1
    }
}

/// Whether a slot stamped `stamp` may hold a flow in epoch `epoch`.
#[inline(always)]
pub const fn seen_admits(stamp: u8, epoch: u8) -> bool {
    stamp != 0 && (stamp == epoch || seen_next(stamp) == epoch)
}

/// The chunk (after the header) and byte of `key`'s slot, for a filter of `mask` + 1 slots.
#[inline(always)]
pub fn seen_place(key: &CtKey, mask: u32) -> (u32, usize) {
    let slot = ct_hash(key) & mask;
    (1 + slot / SEEN_CHUNK, (slot % SEEN_CHUNK) as usize)
}

/// The state a flow opens in: only a SYN opens one (`tcp_opens`).
#[inline(always)]
pub fn tcp_open(_tcp_flags: u8) -> u8 {
    TCP_SYN_SENT
}

/// A TCP SYN (without ACK) on a closed or closing flow starts a new connection, which must
/// be evaluated by policy again rather than ride the old entry.
#[inline(always)]
pub fn tcp_reopens(state: u8, tcp_flags: u8) -> bool {
    matches!(state, TCP_TIME_WAIT | TCP_CLOSE) && tcp_flags & (TH_SYN | TH_ACK | TH_RST) == TH_SYN
}

/// Which timeout applies to a flow.
#[inline(always)]
pub fn timeout_slot(protocol: u8, tcp_state: u8, ct_flags: u8) -> usize {
    match protocol {
        PROTO_TCP => match tcp_state {
            TCP_SYN_SENT => TIMEOUT_TCP_SYN_SENT,
            TCP_SYN_RECV => TIMEOUT_TCP_SYN_RECV,
            TCP_ESTABLISHED => TIMEOUT_TCP_ESTABLISHED,
            TCP_FIN_WAIT | TCP_TIME_WAIT => TIMEOUT_TCP_CLOSING,
            _ => TIMEOUT_TCP_CLOSE,
        },
        PROTO_UDP => {
            if ct_flags & FLAG_STREAM != 0 {
                TIMEOUT_UDP_STREAM
            } else {
                TIMEOUT_UDP
            }
        }
        PROTO_ICMP | PROTO_ICMPV6 => TIMEOUT_ICMP,
        _ => TIMEOUT_OTHER,
    }
}

/// Whether a flow may live in the established table (new flows can never evict it
/// there): what netfilter calls assured. TCP after a complete three-way handshake (a SYN
/// answered by RST, or a flow still in its handshake, never is); UDP once it is a stream
/// (a single request and reply never is); ICMP queries never (a ping exchange is over in
/// one reply); other protocols once a reply was seen.
#[inline(always)]
pub fn is_assured(protocol: u8, _tcp_state: u8, ct_flags: u8) -> bool {
    match protocol {
        PROTO_TCP => ct_flags & FLAG_ASSURED != 0,
        PROTO_UDP => ct_flags & FLAG_STREAM != 0,
        PROTO_ICMP | PROTO_ICMPV6 => false,
        _ => ct_flags & FLAG_SEEN_REPLY != 0,
    }
}

/// ICMP queries that open a flow (SPEC §1.3, as netfilter): for a type, whether it is the
/// request or the reply of its pair, and the pair's number (echo 0, timestamp 1,
/// information 2, address mask 3; ICMPv6 echo 0, node information 1). None for every
/// other type: redirects, router advertisements, errors… never open or match a flow.
#[inline(always)]
pub fn icmp_query(v6: bool, icmp_type: u8) -> Option<(bool, u8)> {
    if v6 {
        match icmp_type {
            128 => Some((true, 0)),
            129 => Some((false, 0)),
            139 => Some((true, 1)),
            140 => Some((false, 1)),
            _ => None,
        }
    } else {
        match icmp_type {
            8 => Some((true, 0)),
            0 => Some((false, 0)),
            13 => Some((true, 1)),
            14 => Some((false, 1)),
            15 => Some((true, 2)),
            16 => Some((false, 2)),
            17 => Some((true, 3)),
            18 => Some((false, 3)),
            _ => None,
        }
    }
}

/// The request type of query pair `pair` (the inverse of `icmp_query`).
pub fn icmp_query_request(v6: bool, pair: u8) -> u8 {
    match (v6, pair) {
        (true, 1) => 139,
        (true, _) => 128,
        (false, 1) => 13,
        (false, 2) => 15,
        (false, 3) => 17,
        (false, _) => 8,
    }
}

/// Whether an entry last seen at `last_seen_ns` has been idle longer than `timeout_s`.
#[inline(always)]
pub fn is_expired(now_ns: u64, last_seen_ns: u64, timeout_s: u32) -> bool {
    now_ns.saturating_sub(last_seen_ns) > timeout_s as u64 * 1_000_000_000
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a sequence of (from_origin, tcp flags) through the state machine.
    fn run(steps: &[(bool, u8)]) -> u8 {
        let (first_origin, first_flags) = steps[0];
        assert!(first_origin);
        let mut state = tcp_open(first_flags);
        let mut flags = 0;
        for &(origin, th) in &steps[1..] {
            (state, flags) = tcp_next(state, origin, th, flags);
        }
        state
    }

    #[test]
    fn tcp_transitions() {
        type Case<'a> = (&'a str, &'a [(bool, u8)], u8);
        let cases: &[Case] = &[
            ("syn", &[(true, TH_SYN)], TCP_SYN_SENT),
            (
                "syn, syn-ack",
                &[(true, TH_SYN), (false, TH_SYN | TH_ACK)],
                TCP_SYN_RECV,
            ),
            (
                "three-way handshake",
                &[(true, TH_SYN), (false, TH_SYN | TH_ACK), (true, TH_ACK)],
                TCP_ESTABLISHED,
            ),
            (
                "fin from origin",
                &[
                    (true, TH_SYN),
                    (false, TH_SYN | TH_ACK),
                    (true, TH_ACK),
                    (true, TH_FIN | TH_ACK),
                ],
                TCP_FIN_WAIT,
            ),
            (
                "both fins",
                &[
                    (true, TH_SYN),
                    (false, TH_SYN | TH_ACK),
                    (true, TH_ACK),
                    (true, TH_FIN | TH_ACK),
                    (false, TH_FIN | TH_ACK),
                ],
                TCP_TIME_WAIT,
            ),
            (
                "rst in handshake",
                &[(true, TH_SYN), (false, TH_RST | TH_ACK)],
                TCP_CLOSE,
            ),
            (
                "rst when established",
                &[
                    (true, TH_SYN),
                    (false, TH_SYN | TH_ACK),
                    (true, TH_ACK),
                    (true, TH_RST),
                ],
                TCP_CLOSE,
            ),
            (
                "a bare reply ACK does not answer a SYN",
                &[(true, TH_SYN), (false, TH_ACK)],
                TCP_SYN_SENT,
            ),
            (
                "retransmitted syn",
                &[(true, TH_SYN), (true, TH_SYN)],
                TCP_SYN_SENT,
            ),
            (
                "ack from origin only",
                &[(true, TH_SYN), (true, TH_ACK)],
                TCP_SYN_SENT,
            ),
        ];
        for (name, steps, want) in cases {
            assert_eq!(run(steps), *want, "{name}");
        }
    }

    #[test]
    fn reopen_only_on_plain_syn_after_close() {
        assert!(tcp_reopens(TCP_CLOSE, TH_SYN));
        assert!(tcp_reopens(TCP_TIME_WAIT, TH_SYN));
        assert!(!tcp_reopens(TCP_ESTABLISHED, TH_SYN));
        assert!(!tcp_reopens(TCP_CLOSE, TH_SYN | TH_ACK));
    }

    #[test]
    fn timeouts_follow_spec_defaults() {
        let t = |p, s, f| DEFAULT_TIMEOUTS[timeout_slot(p, s, f)];
        assert_eq!(t(PROTO_TCP, TCP_ESTABLISHED, 0), 432_000);
        assert_eq!(t(PROTO_TCP, TCP_SYN_SENT, 0), 120);
        assert_eq!(t(PROTO_TCP, TCP_SYN_RECV, 0), 60);
        assert_eq!(t(PROTO_TCP, TCP_FIN_WAIT, 0), 120);
        assert_eq!(t(PROTO_TCP, TCP_TIME_WAIT, 0), 120);
        assert_eq!(t(PROTO_TCP, TCP_CLOSE, 0), 10);
        assert_eq!(t(PROTO_UDP, 0, 0), 30);
        assert_eq!(t(PROTO_UDP, 0, FLAG_STREAM), 180);
        assert_eq!(t(PROTO_ICMP, 0, 0), 30);
        assert_eq!(t(PROTO_ICMPV6, 0, 0), 30);
        assert_eq!(t(47, 0, 0), 600);
    }

    #[test]
    fn assured_only_as_netfilter_says() {
        // Runs a sequence and says whether the flow ends assured.
        let assured = |steps: &[(bool, u8)]| {
            let mut state = tcp_open(steps[0].1);
            let mut flags = 0;
            for &(origin, th) in &steps[1..] {
                (state, flags) = tcp_next(state, origin, th, flags);
                if !origin {
                    flags |= FLAG_SEEN_REPLY;
                }
            }
            is_assured(PROTO_TCP, state, flags)
        };
        assert!(assured(&[
            (true, TH_SYN),
            (false, TH_SYN | TH_ACK),
            (true, TH_ACK)
        ]));
        assert!(
            !assured(&[(true, TH_SYN), (false, TH_RST | TH_ACK)]),
            "refused"
        );
        assert!(
            !assured(&[(true, TH_SYN), (false, TH_SYN | TH_ACK)]),
            "half open"
        );
        assert!(
            !assured(&[(true, TH_SYN), (false, TH_ACK)]),
            "bare reply ACK"
        );
        assert!(
            !is_assured(PROTO_UDP, 0, FLAG_SEEN_REPLY),
            "one request, one reply"
        );
        assert!(is_assured(PROTO_UDP, 0, FLAG_SEEN_REPLY | FLAG_STREAM));
        assert!(
            !is_assured(PROTO_ICMP, 0, FLAG_SEEN_REPLY),
            "a ping exchange"
        );
        assert!(is_assured(47, 0, FLAG_SEEN_REPLY));
    }

    #[test]
    fn tcp_flags_valid_as_netfilter() {
        for ok in [
            TH_SYN,
            TH_SYN | TH_ACK,
            TH_RST,
            TH_RST | TH_ACK,
            TH_FIN | TH_ACK,
            TH_ACK,
            TH_ACK | TH_PSH,
            TH_SYN | TH_URG,
            TH_FIN | TH_ACK | TH_URG,
        ] {
            assert!(tcp_flags_valid(ok), "{ok:#x}");
        }
        for bad in [
            0,
            TH_FIN,
            TH_SYN | TH_FIN,
            TH_SYN | TH_RST,
            TH_FIN | TH_RST,
            TH_PSH,
            TH_URG,
            TH_RST | TH_URG,
            0x3f,
        ] {
            assert!(!tcp_flags_valid(bad), "{bad:#x}");
        }
        assert!(tcp_opens(TH_SYN) && tcp_opens(TH_SYN | TH_PSH));
        for no in [TH_SYN | TH_ACK, TH_ACK, TH_FIN | TH_ACK, TH_RST, 0] {
            assert!(!tcp_opens(no), "{no:#x}");
        }
    }

    #[test]
    fn only_icmp_queries_are_tracked() {
        assert_eq!(icmp_query(false, 8), Some((true, 0)));
        assert_eq!(icmp_query(false, 14), Some((false, 1)));
        assert_eq!(icmp_query(true, 139), Some((true, 1)));
        for other in [3, 5, 9, 10, 11, 12] {
            assert_eq!(icmp_query(false, other), None, "type {other}");
        }
        for other in [1, 2, 133, 134, 136] {
            assert_eq!(icmp_query(true, other), None, "type {other}");
        }
        for (v6, t) in [
            (false, 8),
            (false, 13),
            (false, 15),
            (false, 17),
            (true, 128),
            (true, 139),
        ] {
            let (_, pair) = icmp_query(v6, t).unwrap();
            assert_eq!(icmp_query_request(v6, pair), t);
        }
    }

    #[test]
    fn expiry_is_strictly_after_timeout() {
        assert!(!is_expired(10_000_000_000, 0, 10));
        assert!(is_expired(10_000_000_001, 0, 10));
        assert!(!is_expired(0, 5, 10), "clock behind entry never expires it");
    }

    #[test]
    fn a_stamp_holds_for_its_epoch_and_the_next_only() {
        for e in 1..=255u8 {
            assert!(seen_admits(e, e));
            assert!(seen_admits(e, seen_next(e)), "stamp {e} in the next epoch");
            assert!(
                !seen_admits(e, seen_next(seen_next(e))),
                "stamp {e} two epochs on"
            );
            assert!(!seen_admits(0, e), "a slot never stamped holds no flow");
        }
        assert_eq!(seen_next(255), 1, "epoch 0 is never current");
    }

    #[test]
    fn the_filter_has_twice_the_flows_in_whole_chunks() {
        assert_eq!(seen_slots(262_144, 65_536), 1 << 20);
        assert_eq!(seen_slots(1, 1), SEEN_CHUNK);
        assert_eq!(seen_slots(u32::MAX, u32::MAX), 1 << 31);
        let key = CtKey {
            ifindex: 7,
            family: 4,
            protocol: 6,
            local_port: [0, 80],
            remote_port: [1, 2],
            _pad: [0; 2],
            local: [1; 16],
            remote: [2; 16],
        };
        let (chunk, byte) = seen_place(&key, seen_slots(262_144, 65_536) - 1);
        assert!((1..=256).contains(&chunk) && byte < SEEN_CHUNK as usize);
    }
}
