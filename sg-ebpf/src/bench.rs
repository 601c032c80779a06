//! Benchmark-only programs, built as their own object (`sg-ebpf-bench`) so no production
//! agent loads them: the floors of `cargo xtask bench datapath` (an empty XDP program and
//! one plain hash lookup) and the live-frames traffic generator of the peers benchmark.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(not(target_arch = "bpf"))]
fn main() {
    eprintln!("sg-ebpf-bench is built for the BPF target: cargo xtask build-ebpf");
}

#[cfg(target_arch = "bpf")]
mod programs {
    use aya_ebpf::{
        bindings::{xdp_action, BPF_F_NO_PREALLOC},
        macros::{map, xdp},
        maps::HashMap,
        programs::XdpContext,
    };
    use sg_common::PROTO_TCP;

    /// Benchmark floor: a plain hash map keyed by IPv4 source address (`MAP_BENCH`),
    /// filled by the benchmark.
    #[map]
    pub static SG_BENCH: HashMap<u32, u32> = HashMap::with_max_entries(1 << 18, BPF_F_NO_PREALLOC);

    /// A pointer to a `T` at `off` in the frame, or `Err` when it does not fit.
    #[inline(always)]
    fn ptr_at<T>(ctx: &XdpContext, off: usize) -> Result<*const T, ()> {
        if ctx.data() + off + core::mem::size_of::<T>() > ctx.data_end() {
            return Err(());
        }
        Ok((ctx.data() + off) as *const T)
    }

    /// Benchmark floor: an XDP program that does nothing. Never attached by the agent.
    #[xdp]
    pub fn sg_bench_empty(_ctx: XdpContext) -> u32 {
        xdp_action::XDP_PASS
    }

    /// Benchmark floor: one hash lookup keyed by the IPv4 source address of an untagged
    /// frame, in a plain hash map the benchmark fills. Never attached.
    /// Drops every frame and does nothing else: the physical limit of an XDP filter.
    #[xdp]
    pub fn sg_bench_drop(_ctx: XdpContext) -> u32 {
        xdp_action::XDP_DROP
    }

    #[xdp]
    pub fn sg_bench_hash(ctx: XdpContext) -> u32 {
        let Ok(p) = ptr_at::<[u8; 4]>(&ctx, 26) else {
            return xdp_action::XDP_ABORTED;
        };
        // SAFETY: bounds checked by ptr_at; read-only lookup.
        let key = u32::from_ne_bytes(unsafe { core::ptr::read_unaligned(p) });
        match unsafe { SG_BENCH.get(&key) } {
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
