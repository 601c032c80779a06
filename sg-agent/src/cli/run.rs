//! `sg-agent run`: validate the flags, then start the agent and run it until stopped.

#![forbid(unsafe_code)]

use std::process::ExitCode;
use std::{path::PathBuf, time::Duration};

use clap::{Args, ValueEnum};

use super::DEFAULT_PIN_DIR;
use crate::{
    agent::{self, Agent, RunOptions},
    datapath::{IngressHook, MapSizes},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Hook {
    Xdp,
    Tc,
}

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["state", "etcd"])))]
pub struct RunArgs {
    /// State file (native TOML or AWS JSON); watched for changes.
    #[arg(long)]
    pub state: Option<PathBuf>,
    /// Follow etcd instead (SPEC §8): endpoints, comma-separated (http://HOST:PORT).
    #[arg(long, value_name = "URLS")]
    pub etcd: Option<String>,
    /// Key prefix in etcd.
    #[arg(long, default_value = crate::source::etcd::DEFAULT_PREFIX, requires = "etcd")]
    pub etcd_prefix: String,
    #[command(flatten)]
    pub etcd_security: super::publish::EtcdSecurityArgs,
    /// Bind a local interface to a network interface of the state explicitly.
    #[arg(long, value_name = "IFACE=ENI", value_parser = parse_attach)]
    pub attach: Vec<(String, String)>,
    /// Where maps and links are pinned (on a bpffs; mounted when missing).
    #[arg(long, default_value = DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
    /// Ingress hook: tc (default; keeps TSO/GRO on veth) or xdp (earliest drop).
    #[arg(long, value_enum, default_value = "tc")]
    pub ingress_hook: Hook,
    /// Enforce interfaces that have no security groups (drop all but infrastructure).
    #[arg(long)]
    pub default_deny: bool,
    /// Strict mode: drop tracked connections that a new policy no longer allows.
    #[arg(long)]
    pub revalidate: bool,
    /// Audit mode on every interface: every packet passes; what would have been denied
    /// is counted and logged (flow logs: REJECT, sg-reason audit). Per interface:
    /// `audit = true` (native) or the tag sg:audit=true (AWS JSON).
    #[arg(long)]
    pub audit: bool,
    /// Write AWS VPC Flow Logs records to this file (`-` for stdout); reopened on SIGHUP.
    #[arg(long, value_name = "PATH|-")]
    pub flow_log: Option<PathBuf>,
    /// Flow log record format in AWS's `${field}` syntax (default: AWS's version 2
    /// default format), with sg's own fields sg-group-id, sg-rule-id and sg-reason.
    #[arg(long, value_name = "FMT", value_parser = crate::flowlog::Format::parse)]
    pub flow_log_format: Option<crate::flowlog::Format>,
    /// Flow log aggregation interval in seconds (AWS offers 60 or 600).
    #[arg(long, value_name = "SECS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=86400))]
    pub flow_log_interval: u64,
    /// Serve GET /status and /metrics over HTTP on this address (off unless given).
    #[arg(long, value_name = "ADDR")]
    pub api: Option<std::net::SocketAddr>,
    /// Directory for the agent's own files (default: /run/sg/<pin dir>).
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// Capacity of the established-connection table (at least 1).
    #[arg(long, default_value_t = sg_common::DEFAULT_CT_ENTRIES, value_parser = clap::value_parser!(u32).range(1..))]
    pub conntrack_size: u32,
    /// Capacity of the new-connection (embryonic) table (at least 1).
    #[arg(long, default_value_t = sg_common::DEFAULT_CT_NEW_ENTRIES, value_parser = clap::value_parser!(u32).range(1..))]
    pub conntrack_new_size: u32,
    /// Log lines as text or as one JSON object per line (ts, level, target, message).
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Seconds between conntrack garbage collections (at least 1).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=86400))]
    pub gc_interval: u64,
}

fn parse_attach(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((i, e)) if !i.is_empty() && !e.is_empty() => Ok((i.to_string(), e.to_string())),
        _ => Err(format!("{s:?}: expected IFACE=ENI_ID")),
    }
}

pub(super) fn run(a: RunArgs) -> ExitCode {
    let run_dir = a
        .run_dir
        .clone()
        .unwrap_or_else(|| agent::default_run_dir(&a.pin_dir));
    let etcd = match &a.etcd {
        None => None,
        Some(urls) => {
            match crate::source::etcd::Client::with_security(urls, &a.etcd_security.security()) {
                Ok(client) if a.etcd_prefix.starts_with('/') && a.etcd_prefix.ends_with('/') => {
                    Some(agent::EtcdOptions {
                        client,
                        prefix: a.etcd_prefix.clone(),
                    })
                }
                Ok(_) => {
                    eprintln!(
                        "sg-agent run: --etcd-prefix {:?}: starts and ends with /",
                        a.etcd_prefix
                    );
                    return ExitCode::from(super::EXIT_USAGE);
                }
                Err(e) => {
                    eprintln!("sg-agent run: {e}");
                    return ExitCode::from(super::EXIT_USAGE);
                }
            }
        }
    };
    let opts = RunOptions {
        state: match (&a.state, &a.etcd) {
            (Some(s), _) => s.clone(),
            (None, Some(urls)) => PathBuf::from(format!("etcd:{urls}{}", a.etcd_prefix)),
            (None, None) => unreachable!("clap requires --state or --etcd"),
        },
        etcd,
        attach: a.attach,
        pin_dir: a.pin_dir,
        run_dir,
        hook: match a.ingress_hook {
            Hook::Xdp => IngressHook::Xdp,
            Hook::Tc => IngressHook::Tc,
        },
        default_deny: a.default_deny,
        revalidate: a.revalidate,
        audit: a.audit,
        flow_log: a.flow_log.map(|path| crate::flowlog::Options {
            path,
            format: a.flow_log_format.unwrap_or_default(),
            interval: Duration::from_secs(a.flow_log_interval),
        }),
        api: a.api,
        sizes: MapSizes {
            conntrack: a.conntrack_size,
            conntrack_new: a.conntrack_new_size,
            ..MapSizes::default()
        },
        tick: Duration::from_millis(500),
        gc_interval: Duration::from_secs(a.gc_interval),
    };
    let agent = match Agent::start(opts) {
        Ok(agent) => agent,
        Err(e) => {
            eprintln!("sg-agent: {e}");
            return ExitCode::FAILURE;
        }
    };
    match agent.run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sg-agent: {e}");
            ExitCode::FAILURE
        }
    }
}
