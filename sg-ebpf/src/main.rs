//! sg's kernel programs: XDP or TC on ingress, TC on egress, one policy path.
//!
//! Per packet: parse (fail closed) → infrastructure and non-IP pass → fragments follow
//! their first fragment → related ICMP errors → conntrack → on a miss, policy (constant
//! number of lookups) → open a flow unless the grant makes it untracked.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod account;
#[cfg(target_arch = "bpf")]
mod conntrack;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod parse;
#[cfg(target_arch = "bpf")]
mod policy;

#[cfg(not(target_arch = "bpf"))]
fn main() {
    eprintln!("sg-ebpf is built for the BPF target: cargo xtask build-ebpf");
}

#[cfg(target_arch = "bpf")]
mod programs {
    use aya_ebpf::{
        bindings::{xdp_action, TC_ACT_OK, TC_ACT_SHOT},
        helpers::generated::{bpf_ktime_get_boot_ns, bpf_xdp_get_buff_len},
        macros::{classifier, xdp},
        programs::{TcContext, XdpContext},
    };
    use sg_common::{counter, drop_reason, *};

    use crate::{
        account::{count, event, rule_hit},
        conntrack::{self, echo_kind, Track},
        maps::{SG_FRAGS, SG_GLOBAL, SG_IFACE},
        parse::{self, Frame, Ip, Parsed, FRAG_FIRST, FRAG_LATER},
        policy,
    };

    struct Xdp<'a>(&'a XdpContext);
    impl Frame for Xdp<'_> {
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

    struct Tc<'a>(&'a TcContext);
    impl Frame for Tc<'_> {
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

    #[xdp(frags)]
    pub fn sg_xdp_ingress(ctx: XdpContext) -> u32 {
        if process(&Xdp(&ctx), DIR_INGRESS) {
            xdp_action::XDP_PASS
        } else {
            xdp_action::XDP_DROP
        }
    }

    #[classifier]
    pub fn sg_tc_ingress(ctx: TcContext) -> i32 {
        tc(&ctx, DIR_INGRESS)
    }

    #[classifier]
    pub fn sg_tc_egress(ctx: TcContext) -> i32 {
        tc(&ctx, DIR_EGRESS)
    }

    /// Headers of a TC packet may sit partly outside the linear buffer; pull them in only
    /// when they do. Pulling on every packet would cost a copy of the head of every cloned
    /// skb (TCP transmits clones): a GSO packet's linear part usually holds exactly the
    /// headers, which is all the parser needs.
    #[inline(always)]
    fn tc(ctx: &TcContext, dir: u8) -> i32 {
        let len = ctx.len();
        let linear = (ctx.data_end() - ctx.data()) as u32;
        if linear < len {
            let need = headers_len(&Tc(ctx)).min(len);
            if linear < need {
                let _ = ctx.pull_data(need);
            }
        }
        if process(&Tc(ctx), dir) {
            TC_ACT_OK
        } else {
            TC_ACT_SHOT
        }
    }

    /// Bytes from the start of the frame that parsing needs: Ethernet and VLAN tags, the
    /// IP header (IPv4 by its IHL; IPv6 with room for extension headers) and the L4 header
    /// (room for an ICMP error's quoted packet). Generous when unsure; read from the linear
    /// part, so a frame whose very first headers are not linear gets a full pull.
    #[inline(always)]
    fn headers_len(f: &impl Frame) -> u32 {
        const FALLBACK: u32 = 256;
        let Ok(p) = parse::ptr_at::<[u8; 2]>(f, 12) else {
            return FALLBACK;
        };
        // SAFETY: bounds checked by ptr_at.
        let mut proto = u16::from_be_bytes(unsafe { *p });
        let mut off = 14u32;
        let mut tags = 0;
        while (proto == 0x8100 || proto == 0x88a8) && tags < 2 {
            let Ok(p) = parse::ptr_at::<[u8; 2]>(f, off as usize + 2) else {
                return FALLBACK;
            };
            // SAFETY: bounds checked by ptr_at.
            proto = u16::from_be_bytes(unsafe { *p });
            off += 4;
            tags += 1;
        }
        match proto {
            0x0800 => {
                let Ok(p) = parse::ptr_at::<[u8; 20]>(f, off as usize) else {
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
                let Ok(p) = parse::ptr_at::<[u8; 8]>(f, off as usize) else {
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

    #[inline(always)]
    fn now_ns() -> (u64, u32) {
        // SAFETY: helper without arguments.
        let boot = unsafe { bpf_ktime_get_boot_ns() };
        match SG_GLOBAL.get(0) {
            Some(g) => (boot.wrapping_add(g.clock_offset_ns), g.deny_events_per_sec),
            None => (boot, 0),
        }
    }

    /// The verdict for one packet: `true` passes it.
    #[inline(always)]
    fn process(f: &impl Frame, dir: u8) -> bool {
        let ifindex = f.ifindex();
        // SAFETY: read-only lookup of a plain-old-data value.
        let Some(cfg) = (unsafe { SG_IFACE.get(&ifindex) }) else {
            // Not an enforced interface (the agent detaches before forgetting one).
            return true;
        };
        let ip = match parse::parse(f) {
            Ok(Parsed::Ip(ip)) => ip,
            Ok(Parsed::NotIp { arp }) => {
                count(
                    cfg.counter_slot,
                    dir,
                    if arp {
                        counter::INFRASTRUCTURE
                    } else {
                        counter::NOT_IP
                    },
                );
                return true;
            }
            Err(reason) => {
                count(cfg.counter_slot, dir, counter::drop_slot(reason));
                return false;
            }
        };
        if ip.frag == FRAG_LATER {
            return later_fragment(cfg.counter_slot, ifindex, dir, &ip);
        }
        if parse::is_infrastructure(&ip) {
            count(cfg.counter_slot, dir, counter::INFRASTRUCTURE);
            return true;
        }
        let pass = decide(f, cfg, ifindex, dir, &ip);
        if ip.frag == FRAG_FIRST {
            remember_fragment(ifindex, &ip, pass);
        }
        pass
    }

    #[inline(always)]
    fn decide(f: &impl Frame, cfg: &IfaceConfig, ifindex: u32, dir: u8, ip: &Ip) -> bool {
        let (now, deny_rate) = now_ns();
        if parse::is_icmp_error(ip.family, ip.protocol, ip.l4.icmp_type) {
            // The quoted packet travelled the other way; it names the flow it is about.
            if let Ok(inner) = parse::parse_embedded(f, ip) {
                if conntrack::exists(&conntrack::key_of(ifindex, 1 - dir, &inner)) {
                    count(cfg.counter_slot, dir, counter::ALLOWED_RELATED);
                    return true;
                }
            }
        }
        let len = ip.len;
        let key = conntrack::key_of(ifindex, dir, ip);
        match conntrack::track(&key, ip, dir, cfg, len, now) {
            Track::Hit => {
                count(cfg.counter_slot, dir, counter::ALLOWED_TRACKED);
                return true;
            }
            Track::Full => {
                count(
                    cfg.counter_slot,
                    dir,
                    counter::drop_slot(drop_reason::CONNTRACK_FULL),
                );
                return false;
            }
            Track::Miss => {}
        }
        let Some(grant) = policy::lookup(ifindex, dir, ip) else {
            count(
                cfg.counter_slot,
                dir,
                counter::drop_slot(drop_reason::POLICY),
            );
            event(EVENT_DENIED, ifindex, dir, ip, 0, now, deny_rate);
            return false;
        };
        let untracked = match ip.protocol {
            PROTO_TCP => grant.flags & GRANT_UNTRACKED_TCP != 0,
            PROTO_UDP => grant.flags & GRANT_UNTRACKED_UDP != 0,
            _ => false,
        };
        rule_hit(grant.rule_id);
        if untracked {
            count(cfg.counter_slot, dir, counter::ALLOWED_UNTRACKED);
            return true;
        }
        // Replies, errors and resets open no flow of their own.
        let (echo, request) = echo_kind(ip.family, ip.protocol, ip.l4.icmp_type);
        let opens = match ip.protocol {
            PROTO_ICMP | PROTO_ICMPV6 => !echo || request,
            PROTO_TCP => ip.l4.tcp_flags & ct::TH_RST == 0,
            _ => true,
        };
        if !opens || parse::is_icmp_error(ip.family, ip.protocol, ip.l4.icmp_type) {
            count(cfg.counter_slot, dir, counter::ALLOWED_STATELESS);
            return true;
        }
        conntrack::open(&key, ip, dir, grant.rule_id, len, now);
        count(cfg.counter_slot, dir, counter::ALLOWED_NEW);
        event(
            EVENT_ADMITTED,
            ifindex,
            dir,
            ip,
            grant.rule_id,
            now,
            deny_rate,
        );
        true
    }

    #[inline(always)]
    fn frag_key(ifindex: u32, ip: &Ip) -> FragKey {
        FragKey {
            ifindex,
            family: ip.family,
            protocol: ip.protocol,
            _pad: [0; 2],
            id: ip.frag_id,
            src: ip.src,
            dst: ip.dst,
        }
    }

    #[inline(always)]
    fn remember_fragment(ifindex: u32, ip: &Ip, pass: bool) {
        let entry = FragEntry {
            src_port: ip.l4.sport.to_be_bytes(),
            dst_port: ip.l4.dport.to_be_bytes(),
            allowed: pass as u8,
            _pad: [0; 3],
        };
        let _ = SG_FRAGS.insert(&frag_key(ifindex, ip), &entry, 0);
    }

    /// A non-first fragment follows its first fragment's verdict; with none remembered
    /// (lost, evicted or forged), it is dropped.
    #[inline(always)]
    fn later_fragment(counters: u32, ifindex: u32, dir: u8, ip: &Ip) -> bool {
        // SAFETY: read-only lookup.
        match unsafe { SG_FRAGS.get(&frag_key(ifindex, ip)) } {
            Some(e) if e.allowed != 0 => {
                count(counters, dir, counter::ALLOWED_FRAGMENT);
                true
            }
            Some(_) => {
                count(counters, dir, counter::drop_slot(drop_reason::POLICY));
                false
            }
            None => {
                count(
                    counters,
                    dir,
                    counter::drop_slot(drop_reason::FRAGMENT_ORPHAN),
                );
                false
            }
        }
    }

    /// Benchmark floor: an XDP program that does nothing. Never attached by the agent.
    #[xdp]
    pub fn sg_bench_empty(_ctx: XdpContext) -> u32 {
        xdp_action::XDP_PASS
    }

    /// Benchmark floor: one hash lookup keyed by the IPv4 source address of an untagged
    /// frame, in a plain hash map the benchmark fills. Never attached.
    #[xdp]
    pub fn sg_bench_hash(ctx: XdpContext) -> u32 {
        let Ok(p) = parse::ptr_at::<[u8; 4]>(&Xdp(&ctx), 26) else {
            return xdp_action::XDP_ABORTED;
        };
        // SAFETY: bounds checked by ptr_at; read-only lookup.
        let key = u32::from_ne_bytes(unsafe { core::ptr::read_unaligned(p) });
        match unsafe { crate::maps::SG_BENCH.get(&key) } {
            Some(_) => xdp_action::XDP_PASS,
            None => xdp_action::XDP_DROP,
        }
    }

    /// One's-complement update of a 16-bit checksum for one changed 16-bit word (RFC 1624).
    #[inline(always)]
    fn csum_update(csum: u16, old: u16, new: u16) -> u16 {
        let mut sum = (!csum as u32) + (!old as u32 & 0xffff) + new as u32;
        sum = (sum & 0xffff) + (sum >> 16);
        sum = (sum & 0xffff) + (sum >> 16);
        !(sum as u16)
    }

    #[inline(always)]
    fn get16(p: usize) -> u16 {
        // SAFETY: callers checked the frame holds the 54 bytes these offsets fall in.
        u16::from_be_bytes(unsafe { core::ptr::read_unaligned(p as *const [u8; 2]) })
    }

    #[inline(always)]
    fn set16(p: usize, v: u16) {
        // SAFETY: as in get16.
        unsafe { core::ptr::write_unaligned(p as *mut [u8; 2], v.to_be_bytes()) }
    }

    /// Benchmark traffic generator, run with BPF_PROG_RUN in live-frames mode: rewrites an
    /// Ethernet/IPv4/TCP (or UDP) template to a random source port (and, for TCP, a random
    /// source in 198.19.0.0/16), keeps the checksums valid, and transmits it. Never
    /// attached to an interface.
    #[xdp]
    pub fn sg_gen(ctx: XdpContext) -> u32 {
        let (data, end) = (ctx.data(), ctx.data_end());
        if data + 54 > end {
            return xdp_action::XDP_ABORTED;
        }
        // SAFETY: helper without arguments.
        let r = unsafe { aya_ebpf::helpers::generated::bpf_get_prandom_u32() };
        let proto = unsafe { *((data + 23) as *const u8) };
        let new_port = (r >> 16) as u16 | 1024;
        let old_port = get16(data + 34);
        set16(data + 34, new_port);
        if proto == PROTO_TCP {
            let new_lo = r as u16;
            let old_lo = get16(data + 28);
            set16(data + 28, new_lo);
            set16(data + 24, csum_update(get16(data + 24), old_lo, new_lo));
            let tcp = csum_update(get16(data + 50), old_lo, new_lo);
            set16(data + 50, csum_update(tcp, old_port, new_port));
        }
        // UDP over IPv4 is sent without a checksum (0): nothing more to update.
        xdp_action::XDP_TX
    }

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        loop {}
    }
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
