//! `sg-agent status` and `sg-agent flows`: what the pins say, whether or not the agent
//! runs.

#![forbid(unsafe_code)]

use std::process::ExitCode;

use crate::{conntrack, datapath::Tables, status, sys};

/// The pins must be there and readable: says why not (no pins, or no permission and
/// the capability needed) and gives the exit code.
pub(super) fn check_pins(pin_dir: &std::path::Path, command: &str) -> Result<(), ExitCode> {
    match std::fs::read_dir(pin_dir) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            eprintln!(
                "sg-agent {command}: {}: permission denied; reading the pins needs root (or CAP_BPF with read access to the pin directory)",
                pin_dir.display()
            );
            Err(ExitCode::FAILURE)
        }
        Err(_) => {
            eprintln!(
                "sg-agent {command}: {}: no pins; sg-agent has not run with this --pin-dir",
                pin_dir.display()
            );
            Err(ExitCode::FAILURE)
        }
    }
}

/// A failed read of the pins, in words: a permission problem names the capability.
pub(super) fn read_error(command: &str, e: &impl std::fmt::Display) {
    let text = e.to_string();
    if text.contains("Operation not permitted") || text.contains("Permission denied") {
        eprintln!("sg-agent {command}: {text}: reading BPF maps needs root or CAP_BPF");
    } else {
        eprintln!("sg-agent {command}: {text}");
    }
}

pub(super) fn status(pin_dir: &std::path::Path, json: bool) -> ExitCode {
    if let Err(code) = check_pins(pin_dir, "status") {
        return code;
    }
    let out = match status::pinned_document(pin_dir) {
        Ok(x) => x,
        Err(e) => {
            read_error("status", &e);
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
    if let Some(n) = out["enforcement_lost"]["count"].as_u64().filter(|n| *n > 0) {
        println!("enforcement lost: {n} times (restored)");
    }
    for i in &interfaces {
        let groups: Vec<&str> = i["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|g| g.as_str())
            .collect();
        println!(
            "\n{} (ifindex {}) = {}{}{}",
            i["name"].as_str().unwrap_or("?"),
            i["ifindex"],
            i["network_interface"].as_str().unwrap_or("?"),
            if i["orphaned"] == true {
                "  ORPHANED (keeps its last valid policy)"
            } else {
                ""
            },
            if i["audit"] == true {
                "  AUDIT (nothing is dropped; would-be drops are counted and logged)"
            } else {
                ""
            }
        );
        println!(
            "  groups   {}",
            if groups.is_empty() {
                "-".to_string()
            } else {
                groups.join(", ")
            }
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
    if let Err(code) = check_pins(pin_dir, "flows") {
        return code;
    }
    let flows = match Tables::Pinned(pin_dir).flows() {
        Ok(f) => f,
        Err(e) => {
            read_error("flows", &e);
            return ExitCode::FAILURE;
        }
    };
    let now = sys::boot_ns();
    let rules = crate::agent::pinned_plan(pin_dir)
        .map(|p| p.rules)
        .unwrap_or_default();
    let rows: Vec<serde_json::Value> = flows
        .iter()
        .map(|f| conntrack::flow_json(f, now, &rules))
        .collect();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&rows).unwrap_or_default()
        );
        return ExitCode::SUCCESS;
    }
    // Endpoints as sockets print them: `addr:port`, `[addr]:port` for IPv6; columns as
    // wide as their widest cell.
    let endpoint = |a: &serde_json::Value, p: &serde_json::Value| {
        let a = a.as_str().unwrap_or("");
        match p.as_u64() {
            Some(p) if a.contains(':') => format!("[{a}]:{p}"),
            Some(p) => format!("{a}:{p}"),
            None => a.to_string(),
        }
    };
    let mut table: Vec<[String; 8]> = vec![[
        "ifindex", "proto", "local", "remote", "origin", "state", "rule", "idle s",
    ]
    .map(String::from)];
    for r in &rows {
        table.push([
            r["ifindex"].to_string(),
            r["protocol"].as_str().unwrap_or("").to_string(),
            endpoint(&r["local"], &r["local_port"]),
            endpoint(&r["remote"], &r["remote_port"]),
            r["origin"].as_str().unwrap_or("").to_string(),
            match r["tcp_state"].as_str() {
                Some("") | None => "-".to_string(),
                Some(s) => s.to_string(),
            },
            r["rule_id"].as_str().unwrap_or("-").to_string(),
            r["idle_seconds"].to_string(),
        ]);
    }
    let widths: Vec<usize> = (0..8)
        .map(|c| table.iter().map(|row| row[c].len()).max().unwrap_or(0))
        .collect();
    for row in &table {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(c, (cell, w))| {
                if c == 7 {
                    format!("{cell:>w$}")
                } else {
                    format!("{cell:<w$}")
                }
            })
            .collect();
        println!("{}", cells.join("  ").trim_end());
    }
    ExitCode::SUCCESS
}
