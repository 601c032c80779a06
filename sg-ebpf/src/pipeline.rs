//! The policy path every hook shares, per packet: parse (fail closed) → infrastructure and
//! non-IP pass → fragments follow their first fragment → related ICMP errors → conntrack
//! → on a miss, policy (a constant number of lookups) → open a flow unless the grant makes
//! it untracked. Counters are taken where the decision is made.

use aya_ebpf::{
    bindings::{xdp_action, TC_ACT_SHOT},
    helpers::generated::bpf_ktime_get_boot_ns,
};
use sg_common::{counter, drop_reason, *};

use crate::{
    account::{count, event, rule_hit},
    conntrack::{self, Track},
    fragment,
    maps::{SG_GLOBAL, SG_IFACE},
    parse::{self, Frame, Ip, FRAG_FIRST, FRAG_LATER},
    policy,
};

/// Why a packet is not passed. Every kind is counted by its drop reason where it is found.
#[derive(Clone, Copy)]
pub enum Drop {
    /// It could not be parsed with certainty (SPEC §2).
    Malformed,
    /// Policy, conntrack capacity or fragment state refuses it.
    Denied,
}

impl Drop {
    /// The one place that decides what each kind does on XDP: every kind drops.
    #[inline(always)]
    pub fn xdp_action(self) -> u32 {
        match self {
            Drop::Malformed | Drop::Denied => xdp_action::XDP_DROP,
        }
    }

    /// The same on TC: every kind is shot.
    #[inline(always)]
    pub fn tc_action(self) -> i32 {
        match self {
            Drop::Malformed | Drop::Denied => TC_ACT_SHOT,
        }
    }
}

#[inline(always)]
fn passes(pass: bool) -> Result<(), Drop> {
    if pass {
        Ok(())
    } else {
        Err(Drop::Denied)
    }
}

#[inline(always)]
fn now_ns() -> (u64, u32) {
    // SAFETY: helper without arguments.
    let boot = unsafe { bpf_ktime_get_boot_ns() };
    match SG_GLOBAL.get(0) {
        Some(g) => (boot.wrapping_add(g.clock_offset_ns), g.deny_events_per_sec),
        None => (boot, 0),
    }
}

/// The verdict for one packet: `Ok` passes it. On an interface in audit mode every
/// packet passes; what would have been dropped is counted under its reason and as
/// `AUDIT_PASSED` (SPEC §7).
#[inline(always)]
pub fn process(f: &impl Frame, dir: u8) -> Result<(), Drop> {
    let ifindex = f.ifindex();
    // SAFETY: read-only lookup of a plain-old-data value.
    let Some(cfg) = (unsafe { SG_IFACE.get(&ifindex) }) else {
        // Not an enforced interface (the agent detaches before forgetting one).
        return Ok(());
    };
    let bytes = f.wire_len();
    match judge(f, cfg, ifindex, dir, bytes) {
        Err(_) if cfg.flags & IFACE_AUDIT != 0 => {
            count(cfg.counter_slot, dir, counter::AUDIT_PASSED, bytes);
            Ok(())
        }
        verdict => verdict,
    }
}

#[inline(always)]
fn judge(f: &impl Frame, cfg: &IfaceConfig, ifindex: u32, dir: u8, bytes: u32) -> Result<(), Drop> {
    let mut ip = Ip::default();
    match parse::parse_into(f, &mut ip) {
        parse::PARSED_IP => {}
        parse::PARSED_ARP => {
            count(cfg.counter_slot, dir, counter::INFRASTRUCTURE, bytes);
            return Ok(());
        }
        parse::PARSED_NOT_IP => {
            count(cfg.counter_slot, dir, counter::NOT_IP, bytes);
            return Ok(());
        }
        reason => {
            count(
                cfg.counter_slot,
                dir,
                counter::drop_slot(reason as u32),
                bytes,
            );
            return Err(Drop::Malformed);
        }
    };
    if ip.frag == FRAG_LATER {
        let now_s = (now_ns().0 / 1_000_000_000) as u32;
        return passes(fragment::later(
            cfg.counter_slot,
            ifindex,
            dir,
            &ip,
            now_s,
            bytes,
        ));
    }
    if parse::is_infrastructure(&ip) {
        count(cfg.counter_slot, dir, counter::INFRASTRUCTURE, bytes);
        return Ok(());
    }
    let (now, deny_rate) = now_ns();
    // One place denies (one copy of the event code on the program's stack).
    let pass = match decide(f, cfg, ifindex, dir, &ip, bytes, now, deny_rate) {
        Ok(()) => true,
        Err(reason) => deny(cfg, ifindex, dir, &ip, reason, now, deny_rate, bytes),
    };
    if ip.frag == FRAG_FIRST && pass {
        let now_s = (now_ns().0 / 1_000_000_000) as u32;
        fragment::remember(ifindex, dir, &ip, now_s);
    }
    passes(pass)
}

/// Counts a denial under `reason` and reports it as a flow event (rate-limited).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn deny(
    cfg: &IfaceConfig,
    ifindex: u32,
    dir: u8,
    ip: &Ip,
    reason: u32,
    now: u64,
    deny_rate: u32,
    bytes: u32,
) -> bool {
    count(cfg.counter_slot, dir, counter::drop_slot(reason), bytes);
    let kind = if cfg.flags & IFACE_AUDIT != 0 {
        EVENT_AUDITED
    } else {
        EVENT_DENIED
    };
    event(
        cfg.counter_slot,
        kind,
        ifindex,
        dir,
        ip,
        reason,
        now,
        deny_rate,
        // As conntrack counts a flow's bytes: from the Ethernet header to the end of the
        // IP packet (no padding).
        ip.len,
    );
    false
}

/// Whether the packet passes (policy and conntrack); `Err` names the drop reason.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn decide(
    f: &impl Frame,
    cfg: &IfaceConfig,
    ifindex: u32,
    dir: u8,
    ip: &Ip,
    bytes: u32,
    now: u64,
    deny_rate: u32,
) -> Result<(), u32> {
    if ip.protocol == PROTO_TCP && !ct::tcp_flags_valid(ip.l4.tcp_flags) {
        return Err(drop_reason::INVALID_TCP_FLAGS);
    }
    let icmp_error = parse::is_icmp_error(ip.family, ip.protocol, ip.l4.icmp_type);
    if icmp_error {
        // The quoted packet travelled the other way and names the flow it is about. As in
        // netfilter, the error goes to the endpoint that sent the quoted packet, and the
        // flow must be live: otherwise it is judged by the rules like any packet.
        if related(f, ip, cfg, dir, now) {
            count(cfg.counter_slot, dir, counter::ALLOWED_RELATED, bytes);
            return Ok(());
        }
    }
    let query = conntrack::query_of(ip);
    // Only ICMP queries are tracked: any other ICMP is judged by the rules, packet by
    // packet, and never matches a flow.
    let trackable = !matches!(ip.protocol, PROTO_ICMP | PROTO_ICMPV6) || query.is_some();
    let key = conntrack::key_of(ifindex, dir, ip);
    let tracked = if trackable {
        conntrack::track(&key, ip, dir, cfg, now)
    } else {
        Track::Miss
    };
    match tracked {
        Track::Hit => {
            count(cfg.counter_slot, dir, counter::ALLOWED_TRACKED, bytes);
            return Ok(());
        }
        Track::Full => {
            return Err(drop_reason::CONNTRACK_FULL);
        }
        Track::OutOfWindow => {
            return Err(drop_reason::TCP_OUT_OF_WINDOW);
        }
        Track::Miss => {}
    }
    let Some(grant) = policy::lookup(ifindex, dir, ip) else {
        return Err(drop_reason::POLICY);
    };
    let untracked = match ip.protocol {
        PROTO_TCP => grant.flags & GRANT_UNTRACKED_TCP != 0,
        PROTO_UDP => grant.flags & GRANT_UNTRACKED_UDP != 0,
        _ => false,
    };
    rule_hit(cfg.counter_slot, dir, grant.rule_id);
    if untracked {
        count(cfg.counter_slot, dir, counter::ALLOWED_UNTRACKED, bytes);
        return Ok(());
    }
    // Only a SYN opens a TCP flow and only a request an ICMP one; other packets are judged
    // packet by packet (SPEC §1.3, §1.11). A UDP packet that answers a flow the other
    // direction admits untracked is such a reply too: it never opens a flow of its own.
    let opens = match ip.protocol {
        PROTO_ICMP | PROTO_ICMPV6 => matches!(query, Some((true, _))),
        PROTO_TCP => ct::tcp_opens(ip.l4.tcp_flags),
        PROTO_UDP => !answers_untracked(ifindex, dir, ip),
        _ => true,
    };
    if !opens {
        count(cfg.counter_slot, dir, counter::ALLOWED_STATELESS, bytes);
        return Ok(());
    }
    let opening = conntrack::Opening {
        dir,
        rule_id: grant.rule_id,
        now,
    };
    conntrack::open(&key, ip, &opening);
    count(cfg.counter_slot, dir, counter::ALLOWED_NEW, bytes);
    event(
        cfg.counter_slot,
        EVENT_ADMITTED,
        ifindex,
        dir,
        ip,
        grant.rule_id,
        now,
        deny_rate,
        bytes,
    );
    Ok(())
}

/// Whether an ICMP error is related to a live flow: its quoted packet names the flow, and
/// it goes to the endpoint that sent the quoted packet (SPEC §1.4). A function of its own
/// (a BPF-to-BPF call): the quoted packet's header and key are on the stack only while it
/// runs, not beside the whole policy path's.
#[inline(never)]
fn related(f: &impl Frame, ip: &Ip, cfg: &IfaceConfig, dir: u8, now: u64) -> bool {
    match parse::parse_embedded(f, ip) {
        Ok(inner) => {
            ip.dst == inner.src
                && conntrack::exists(
                    &conntrack::key_of(f.ifindex(), opposite(dir), &inner),
                    cfg,
                    now,
                )
        }
        Err(_) => false,
    }
}

/// Whether a UDP packet with no flow answers one that the opposite direction admits
/// untracked (SPEC §1.11: an untracked flow's replies never open a flow): the packet
/// reversed, looked up in the other direction, has an untracked grant. Costs a policy
/// lookup on UDP misses only.
#[inline(always)]
fn answers_untracked(ifindex: u32, dir: u8, ip: &Ip) -> bool {
    // The request this would answer came from the same peer to this packet's source
    // port, the other way.
    policy::lookup_at(
        ifindex,
        opposite(dir),
        ip.family,
        policy::remote_of(dir, ip),
        PROTO_UDP,
        ip.l4.sport,
    )
    .is_some_and(|g| g.flags & GRANT_UNTRACKED_UDP != 0)
}
