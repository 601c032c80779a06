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

// TCP header flag bits (byte 13 of the header).
pub const TH_FIN: u8 = 0x01;
pub const TH_SYN: u8 = 0x02;
pub const TH_RST: u8 = 0x04;
pub const TH_ACK: u8 = 0x10;

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
            if !from_origin && tcp_flags & (TH_SYN | TH_ACK) == TH_SYN | TH_ACK {
                TCP_SYN_RECV
            } else if !from_origin && tcp_flags & TH_SYN == 0 && tcp_flags & TH_ACK != 0 {
                // Reply ACK without SYN on a half-open flow: simultaneous open or pick-up.
                TCP_ESTABLISHED
            } else {
                TCP_SYN_SENT
            }
        }
        TCP_SYN_RECV => {
            if from_origin && tcp_flags & TH_ACK != 0 && tcp_flags & TH_SYN == 0 {
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

/// The state a flow opens in, from its first (allowed) packet.
#[inline(always)]
pub fn tcp_open(tcp_flags: u8) -> u8 {
    if tcp_flags & TH_RST != 0 {
        TCP_CLOSE
    } else if tcp_flags & TH_SYN != 0 && tcp_flags & TH_ACK == 0 {
        TCP_SYN_SENT
    } else {
        // Mid-stream pick-up (netfilter's loose mode): the flow was established before we
        // saw it, e.g. the conntrack table was lost.
        TCP_ESTABLISHED
    }
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

/// Whether a flow may live in the established table (new flows can never evict it there).
#[inline(always)]
pub fn is_assured(protocol: u8, tcp_state: u8, ct_flags: u8) -> bool {
    if ct_flags & FLAG_SEEN_REPLY == 0 {
        return false;
    }
    protocol != PROTO_TCP || tcp_state >= TCP_ESTABLISHED
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
            ("mid-stream pick-up", &[(true, TH_ACK)], TCP_ESTABLISHED),
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
    fn assured_needs_reply_and_tcp_established() {
        assert!(!is_assured(PROTO_UDP, 0, 0));
        assert!(is_assured(PROTO_UDP, 0, FLAG_SEEN_REPLY));
        assert!(!is_assured(PROTO_TCP, TCP_SYN_RECV, FLAG_SEEN_REPLY));
        assert!(is_assured(PROTO_TCP, TCP_ESTABLISHED, FLAG_SEEN_REPLY));
    }

    #[test]
    fn expiry_is_strictly_after_timeout() {
        assert!(!is_expired(10_000_000_000, 0, 10));
        assert!(is_expired(10_000_000_001, 0, 10));
        assert!(!is_expired(0, 5, 10), "clock behind entry never expires it");
    }
}
