//! sg-agent: AWS-style security groups enforced in the kernel with eBPF.
//!
//! One room per job (docs/design.md has the whole map):
//! - `model`: the state (groups, prefix lists, interfaces) and its validation;
//! - `source`: where the state comes from (files in the native and AWS JSON formats);
//! - `compile`: pure: state + local interfaces → plan, plan diffs, the membership path;
//! - `eval`: the reference evaluator that the compiler is tested against;
//! - `datapath`: loading, attaching, pins, map writes and readers (the only aya user);
//! - `agent`: the loop, reconcile, watch, persist;
//! - `conntrack`: GC, revalidation, flows; `events`: flow events from the ring buffer;
//! - `status`: the status document and metrics, for `api` and `cli`;
//! - `cli`: the command line; `api`: the optional HTTP API;
//! - `sys`: every libc call, and the only module allowed `unsafe`.
#![deny(unsafe_code)]

pub mod agent;
pub mod api;
pub mod change;
pub mod cli;
pub mod compile;
pub mod conntrack;
pub mod datapath;
pub mod eval;
pub mod events;
pub mod flowlog;
pub mod model;
pub mod net;
pub mod notify;
pub mod source;
pub mod status;
pub mod sys;
#[cfg(feature = "testgen")]
pub mod testgen;
