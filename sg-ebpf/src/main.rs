//! sg's kernel programs: XDP or TC on ingress, TC on egress, one policy path
//! (`pipeline`). This file holds the entry points only; benchmark programs live in the
//! separate `sg-ebpf-bench` object (`src/bench.rs`), which no agent loads.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod account;
#[cfg(target_arch = "bpf")]
mod conntrack;
#[cfg(target_arch = "bpf")]
mod fragment;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod parse;
#[cfg(target_arch = "bpf")]
mod pipeline;
#[cfg(target_arch = "bpf")]
mod policy;

#[cfg(not(target_arch = "bpf"))]
fn main() {
    eprintln!("sg-ebpf is built for the BPF target: cargo xtask build-ebpf");
}

#[cfg(target_arch = "bpf")]
mod programs {
    use aya_ebpf::{
        bindings::{xdp_action, TC_ACT_OK},
        macros::{classifier, xdp},
        programs::{TcContext, XdpContext},
    };
    use sg_common::{DIR_EGRESS, DIR_INGRESS};

    use crate::{
        parse::{self, TcFrame, XdpFrame},
        pipeline::{process, Drop},
    };

    #[xdp(frags)]
    pub fn sg_xdp_ingress(ctx: XdpContext) -> u32 {
        match process(&XdpFrame(&ctx), DIR_INGRESS) {
            Ok(()) => xdp_action::XDP_PASS,
            Err(e) => e.xdp_action(),
        }
    }

    #[classifier]
    pub fn sg_tc_ingress(ctx: TcContext) -> i32 {
        match try_tc(&ctx, DIR_INGRESS) {
            Ok(()) => TC_ACT_OK,
            Err(e) => e.tc_action(),
        }
    }

    #[classifier]
    pub fn sg_tc_egress(ctx: TcContext) -> i32 {
        match try_tc(&ctx, DIR_EGRESS) {
            Ok(()) => TC_ACT_OK,
            Err(e) => e.tc_action(),
        }
    }

    /// Headers of a TC packet may sit partly outside the linear buffer; pull them in only
    /// when they do. Pulling on every packet would cost a copy of the head of every cloned
    /// skb (TCP transmits clones): a GSO packet's linear part usually holds exactly the
    /// headers, which is all the parser needs.
    #[inline(always)]
    fn try_tc(ctx: &TcContext, dir: u8) -> Result<(), Drop> {
        pull_headers(ctx);
        process(&TcFrame(ctx), dir)
    }

    /// A function of its own (a BPF-to-BPF call): whether it pulled or not, nothing it
    /// computed outlives it, so the verifier sees one state after it, not one per branch.
    #[inline(never)]
    fn pull_headers(ctx: &TcContext) {
        let len = ctx.len();
        let linear = (ctx.data_end() - ctx.data()) as u32;
        if linear < len {
            let need = parse::headers_len(&TcFrame(ctx)).min(len);
            if linear < need {
                let _ = ctx.pull_data(need);
            }
        }
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
