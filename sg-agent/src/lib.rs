//! sg-agent: AWS-style security groups enforced in the kernel with eBPF.
//!
//! Modules by job: `model` (the state and its validation), `source` (native and AWS JSON
//! files), `compile` (pure: state + local interfaces → plan, and plan diffs), `eval` (the
//! reference evaluator), `datapath` (the only module that touches aya).
#![deny(unsafe_code)]

pub mod agent;
pub mod api;
pub mod cli;
pub mod compile;
pub mod datapath;
pub mod eval;
pub mod inotify;
pub mod model;
pub mod net;
pub mod source;
pub mod system;
pub mod testgen;
