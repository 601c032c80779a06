//! Connection-tracking decisions: TCP state transitions and idle-timeout choice. Pure
//! functions, unit-tested here and compiled into the kernel program.

use crate::{PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP};

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
}
