//! `sg-agent status` and `sg-agent flows`: what the pins say, whether or not the agent
//! runs.

#![forbid(unsafe_code)]

use std::process::ExitCode;

use crate::{conntrack, datapath::Tables, status, sys};

pub(super) fn status(pin_dir: &std::path::Path, json: bool) -> ExitCode {
    if !pin_dir.exists() {
        eprintln!(
            "{}: no pins; sg-agent has not run with this --pin-dir",
            pin_dir.display()
        );
        return ExitCode::FAILURE;
    }
    let out = match status::pinned_document(pin_dir) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("sg-agent status: {e}");
            return ExitCode::FAILURE;
        }
    };
    let interfaces = out["interfaces"].as_array().cloned().unwrap_or_default();
    let agent_running = out["agent_running"].as_bool().unwrap_or(false);
    if json {
        println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
        return ExitCode::SUCCESS;
    }
    println!("pins:            {}", pin_dir.display());
    println!("agent running:   {agent_running}");
    println!(
        "state:           {}",
        out["state_path"].as_str().unwrap_or("-")
    );
    println!(
        "applied sha256:  {}",
        out["applied_state_sha256"].as_str().unwrap_or("-")
    );
    println!(
        "ingress hook:    {}",
        out["ingress_hook"].as_str().unwrap_or("-")
    );
    println!(
        "last error:      {}",
        out["last_error"].as_str().unwrap_or("none")
    );
    for i in &interfaces {
        println!(
            "\n{} (ifindex {}) = {}",
            i["name"].as_str().unwrap_or("?"),
            i["ifindex"],
            i["network_interface"].as_str().unwrap_or("?")
        );
        for dir in ["ingress", "egress"] {
            let nonzero: Vec<String> = i["counters"][dir]
                .as_object()
                .into_iter()
                .flatten()
                .filter(|(_, v)| v.as_u64() != Some(0))
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            println!(
                "  {dir:<8} {}",
                if nonzero.is_empty() {
                    "-".to_string()
                } else {
                    nonzero.join(" ")
                }
            );
        }
    }
    ExitCode::SUCCESS
}

pub(super) fn flows(pin_dir: &std::path::Path, json: bool) -> ExitCode {
    let flows = match Tables::Pinned(pin_dir).flows() {
        Ok(f) => f,
        Err(e) => {
            eprintln!("sg-agent flows: {e}");
            return ExitCode::FAILURE;
        }
    };
    let now = sys::boot_ns();
    let rows: Vec<serde_json::Value> = flows.iter().map(|f| conntrack::flow_json(f, now)).collect();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&rows).unwrap_or_default()
        );
        return ExitCode::SUCCESS;
    }
    println!(
        "{:<7} {:<6} {:<40} {:<40} {:<8} {:<12} {:>8}",
        "ifindex", "proto", "local", "remote", "origin", "state", "idle s"
    );
    for r in &rows {
        let ep = |a: &serde_json::Value, p: &serde_json::Value| match p.as_u64() {
            Some(p) => format!("{}:{p}", a.as_str().unwrap_or("")),
            None => a.as_str().unwrap_or("").to_string(),
        };
        println!(
            "{:<7} {:<6} {:<40} {:<40} {:<8} {:<12} {:>8}",
            r["ifindex"],
            r["protocol"].as_str().unwrap_or(""),
            ep(&r["local"], &r["local_port"]),
            ep(&r["remote"], &r["remote_port"]),
            r["origin"].as_str().unwrap_or(""),
            r["tcp_state"].as_str().unwrap_or(""),
            r["idle_seconds"]
        );
    }
    ExitCode::SUCCESS
}
