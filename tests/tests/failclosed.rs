//! Fail closed (SPEC §3, §4, §6): no operator mistake, race or restart switches
//! enforcement off. Real agents in namespaces, real sockets; every test here failed on the
//! main branch before this suite was written (the closing note of the change has what
//! each one showed there).

use std::{
    io::Write,
    time::{Duration, Instant},
};

use sg_tests::{
    lab::{example, tcp, write_state, Host, Lab, Prober, TempDir, TwoTier},
    privileges::require_root,
    wait_for,
};

/// The database's network interface in examples/two-tier.*.
const DB_ENI: &str = "eni-000000000000000db";

/// Runs a command that must exit by itself at once: one still running after 10 s (an
/// agent that should have refused to start) fails the test.
fn exits(cmd: &mut std::process::Command) -> std::process::Output {
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let started = Instant::now();
    while child.try_wait().expect("wait").is_none() {
        if started.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "{cmd:?} was still running after 10 s:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

fn status(host: &Host) -> serde_json::Value {
    host.status().expect("sg-agent status --json")
}

/// Waits until the running agent reports `what` about the state it was given.
fn wait_status(host: &Host, what: &str, mut ok: impl FnMut(&serde_json::Value) -> bool) {
    wait_for(what, Duration::from_secs(10), || {
        let st = host.status()?;
        ok(&st).then_some(())
    });
}

/// The two checks that must hold whatever happens to the state file: the outsider is
/// denied, web1 is admitted.
fn still_enforced(t: &TwoTier, what: &str) {
    assert!(
        !tcp::reaches(&t.outsider.ns, "198.18.2.21:3306"),
        "{what}: denied traffic passed"
    );
    assert!(
        tcp::reaches(&t.web1.ns, "198.18.2.21:3306"),
        "{what}: allowed traffic was dropped"
    );
}

#[test]
fn an_empty_state_is_rejected_and_the_last_valid_one_stays_enforced() {
    if !require_root("an_empty_state_is_rejected_and_the_last_valid_one_stays_enforced") {
        return;
    }
    let t = Lab::two_tier();
    let dir = TempDir::new("empty");
    for (file, base) in [
        ("state.toml", "two-tier.toml"),
        ("state.json", "two-tier.json"),
    ] {
        let state = dir.path(file);
        let sha = write_state(&state, &example(base));
        let mut agent =
            t.db.start_agent(&state, &[], &dir.path(&format!("{file}.log")));
        t.db.wait_applied(&sha, &mut agent);
        still_enforced(&t, base);
        for (what, text) in [
            ("a 0-byte file", ""),
            ("only white space", "\n  \n\t\n"),
            ("only comments", "# the state\n# is being rewritten\n"),
            ("a JSON object of another API", "{\"Reservations\":[]}"),
        ] {
            write_state(&state, text);
            wait_status(
                &t.db,
                &format!("{base}, {what}: the error in status"),
                |st| {
                    st["last_error"]
                        .as_str()
                        .is_some_and(|e| e.contains("empty state"))
                },
            );
            assert_eq!(
                status(&t.db)["applied_state_sha256"].as_str(),
                Some(sha.as_str()),
                "{base}, {what}: the last valid state stays applied"
            );
            still_enforced(&t, &format!("{base}, {what}"));
        }
        agent.stop();
    }
}

#[test]
fn orphaned_interfaces_keep_their_last_valid_policy() {
    if !require_root("orphaned_interfaces_keep_their_last_valid_policy") {
        return;
    }
    let t = Lab::two_tier();
    let dir = TempDir::new("orphan");
    let json = dir.path("state.json");
    let base = example("two-tier.json");
    let sha = write_state(&json, &base);
    let mut agent = t.db.start_agent(&json, &[], &dir.path("json.log"));
    t.db.wait_applied(&sha, &mut agent);
    let orphaned = |st: &serde_json::Value| {
        st["orphaned"].as_array().is_some_and(|o| {
            o.iter()
                .any(|i| i["network_interface"].as_str() == Some(DB_ENI))
        })
    };
    let cases = [
        (
            "a misspelt NetworkInterfaces key",
            base.replace("\"NetworkInterfaces\"", "\"NetworkInterface\""),
            false,
        ),
        (
            "its MAC address changed in the state",
            base.replace("02:5e:00:00:02:01", "02:5e:00:00:02:99"),
            true,
        ),
    ];
    for (what, text, members_kept) in cases {
        let new = write_state(&json, &text);
        t.db.wait_applied(&new, &mut agent);
        wait_status(&t.db, &format!("{what}: db reported orphaned"), orphaned);
        if members_kept {
            still_enforced(&t, what);
        } else {
            // With no interfaces in the state, web-sg has no members: web1 is no longer
            // admitted (a group with no members matches nothing), but nothing opens up.
            assert!(
                !tcp::reaches(&t.outsider.ns, "198.18.2.21:3306"),
                "{what}: denied traffic passed"
            );
        }
        let log = agent.log_text();
        assert!(log.contains("orphaned"), "{what}: the log says so:\n{log}");
        // Back to the original: no longer orphaned.
        t.db.wait_applied(&write_state(&json, &base), &mut agent);
        wait_status(&t.db, &format!("{what}: db bound again"), |st| {
            !orphaned(st)
        });
    }
    agent.stop();
    // The native format: the ENI removed from the file, across a restart too.
    let toml = dir.path("state.toml");
    let full = example("two-tier.toml");
    let without_db = match full.find(&format!("id = \"{DB_ENI}\"")) {
        Some(at) => full[..full[..at].rfind("[[interface]]").expect("db table")].to_string(),
        None => panic!("examples/two-tier.toml has no {DB_ENI}"),
    };
    let sha = write_state(&toml, &full);
    let mut agent = t.db.start_agent(&toml, &[], &dir.path("toml-1.log"));
    t.db.wait_applied(&sha, &mut agent);
    let sha = write_state(&toml, &without_db);
    t.db.wait_applied(&sha, &mut agent);
    wait_status(&t.db, "ENI removed: db orphaned", orphaned);
    still_enforced(&t, "its ENI removed from the state");
    agent.stop();
    let mut agent = t.db.start_agent(&toml, &[], &dir.path("toml-2.log"));
    t.db.wait_applied(&sha, &mut agent);
    wait_status(&t.db, "restarted: db still orphaned", orphaned);
    still_enforced(&t, "restarted with its ENI still missing");
    // Listed with no groups: released on purpose, the database is open.
    let released = full.replace("groups = [\"sg-0a000000000000db\"]", "groups = []");
    t.db.wait_applied(&write_state(&toml, &released), &mut agent);
    wait_status(&t.db, "released", |st| !orphaned(st));
    wait_for("db open once released", Duration::from_secs(5), || {
        tcp::reaches(&t.outsider.ns, "198.18.2.21:3306").then_some(())
    });
    agent.stop();
}

#[test]
fn a_half_written_state_file_is_never_acted_on() {
    if !require_root("a_half_written_state_file_is_never_acted_on") {
        return;
    }
    let t = Lab::two_tier();
    let dir = TempDir::new("slow");
    let state = dir.path("state.toml");
    let text = example("two-tier.toml");
    let sha = write_state(&state, &text);
    let mut agent = t.db.start_agent(&state, &[], &dir.path("agent.log"));
    t.db.wait_applied(&sha, &mut agent);
    let prober = Prober::start(&t.outsider.ns, "198.18.2.21:3306");
    // A slow writer: truncate in place, pause, then write in pieces, then close.
    let edited = text.replace("# ", "#  ");
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&state)
            .expect("open for writing");
        std::thread::sleep(Duration::from_secs(3));
        for piece in edited.as_bytes().chunks(edited.len() / 8 + 1) {
            f.write_all(piece).expect("write");
            f.flush().expect("flush");
            std::thread::sleep(Duration::from_millis(150));
        }
    }
    let new = sg_agent::source::sha256_hex(edited.as_bytes());
    t.db.wait_applied(&new, &mut agent);
    let (probes, delivered) = prober.finish();
    assert!(probes > 10, "the prober ran ({probes} probes)");
    assert_eq!(
        delivered, 0,
        "denied probes delivered while the file was being written"
    );
    still_enforced(&t, "after the slow write");
    agent.stop();
}

#[test]
fn a_change_written_while_the_agent_starts_is_never_lost() {
    if !require_root("a_change_written_while_the_agent_starts_is_never_lost") {
        return;
    }
    let (_lab, db, _web3) = Lab::db_and_web3();
    let dir = TempDir::new("startrace");
    let state = dir.path("state.toml");
    let base = example("two-tier.toml");
    let mut rng = sg_agent::testgen::Rng::new(0x5eed);
    for i in 0..50 {
        write_state(&state, &format!("{base}\n# start {i}\n"));
        let mut agent = db.start_agent(&state, &[], &dir.path(&format!("agent-{i}.log")));
        std::thread::sleep(Duration::from_millis(rng.below(200)));
        let last = write_state(&state, &format!("{base}\n# start {i}, changed\n"));
        let written = Instant::now();
        // Within a second of the change, or of the agent's first apply if that is later.
        let mut first_apply = None;
        loop {
            let st = db.status();
            let mine = st
                .as_ref()
                .is_some_and(|s| s["agent_pid"].as_u64() == Some(agent.child.id() as u64));
            if mine {
                let st = st.expect("status");
                let applied = st["applied_state_sha256"].as_str().map(str::to_string);
                first_apply.get_or_insert_with(Instant::now);
                if applied.as_deref() == Some(last.as_str()) {
                    break;
                }
            }
            let since = first_apply.map_or(written, |f| f.max(written));
            if first_apply.is_some() && since.elapsed() > Duration::from_secs(1) {
                panic!(
                    "start {i}: the change written {:?} after the start was not applied within 1 s:\n{}",
                    written.elapsed(),
                    agent.log_text()
                );
            }
            if written.elapsed() > Duration::from_secs(20) {
                panic!("start {i}: the agent never started:\n{}", agent.log_text());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        agent.stop();
    }
}

#[test]
fn one_agent_owns_the_pins_and_lost_enforcement_is_restored() {
    if !require_root("one_agent_owns_the_pins_and_lost_enforcement_is_restored") {
        return;
    }
    let t = Lab::two_tier();
    let dir = TempDir::new("owner");
    let state = dir.path("state.toml");
    let sha = write_state(&state, &example("two-tier.toml"));
    let mut agent = t.db.start_agent(&state, &[], &dir.path("agent-1.log"));
    t.db.wait_applied(&sha, &mut agent);
    // A second agent on the same pins exits 1 and names the holder.
    let out = exits(
        t.db.cmd(sg_tests::lab::agent_bin())
            .args(["run", "--state"])
            .arg(&state),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "second run: {err}");
    assert!(
        err.contains(&format!("pid {}", agent.child.id())),
        "the error names the holder: {err}"
    );
    still_enforced(&t, "after a second run was refused");
    // detach refuses while the agent runs.
    let out =
        t.db.cmd(sg_tests::lab::agent_bin())
            .arg("detach")
            .output()
            .expect("detach");
    assert_eq!(out.status.code(), Some(1), "detach under a running agent");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--force"));
    still_enforced(&t, "after detach was refused");
    // Pins removed behind the agent's back: detected, counted, restored.
    let rm =
        t.db.cmd("sh")
            .args(["-c", "rm -rf /sys/fs/bpf/sg/links /sys/fs/bpf/sg/SG_IFACE"])
            .output()
            .expect("rm");
    assert!(rm.status.success());
    wait_status(&t.db, "enforcement lost counted", |st| {
        st["enforcement_lost"]["count"].as_u64() >= Some(1)
    });
    wait_for("enforcement restored", Duration::from_secs(5), || {
        (!tcp::reaches(&t.outsider.ns, "198.18.2.21:3306")).then_some(())
    });
    still_enforced(&t, "after restoring");
    let log = agent.log_text();
    assert!(log.contains("enforcement lost"), "{log}");
    // detach --force stops the agent, then detaches: the database is open.
    let out =
        t.db.cmd(sg_tests::lab::agent_bin())
            .args(["detach", "--force"])
            .output()
            .expect("detach --force");
    assert!(
        out.status.success(),
        "detach --force: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st = agent.child.wait().expect("agent exit");
    assert!(st.success(), "the agent stopped cleanly: {st}");
    let links =
        t.db.cmd("ip")
            .args(["link", "show", "eth0"])
            .output()
            .unwrap();
    assert!(
        tcp::reaches(&t.outsider.ns, "198.18.2.21:3306"),
        "detached: the database is open\ndetach said: {}{}\n{}\nagent log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&links.stdout),
        agent.log_text()
    );
}

#[test]
fn bad_attach_and_flags_fail_before_touching_anything() {
    if !require_root("bad_attach_and_flags_fail_before_touching_anything") {
        return;
    }
    let t = Lab::two_tier();
    let dir = TempDir::new("flags");
    let state = dir.path("state.toml");
    let sha = write_state(&state, &example("two-tier.toml"));
    let run = |args: &[&str]| {
        exits(
            t.db.cmd(sg_tests::lab::agent_bin())
                .args(["run", "--state"])
                .arg(&state)
                .args(args),
        )
    };
    for (args, code, says) in [
        (&["--attach", "eth0=eni-nope"][..], 1, "eni-nope"),
        (&["--attach", "eth9=eni-000000000000000db"][..], 1, "eth9"),
        (&["--conntrack-size", "0"][..], 64, "conntrack-size"),
        (&["--conntrack-new-size", "0"][..], 64, "conntrack-new-size"),
        (&["--gc-interval", "0"][..], 64, "gc-interval"),
    ] {
        let out = run(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?} names the problem: {err}");
        assert!(
            !t.db
                .cmd("test")
                .args(["-e", "/sys/fs/bpf/sg/links"])
                .status()
                .expect("test")
                .success(),
            "{args:?}: nothing attached"
        );
    }
    // A conntrack size other than the pinned table's is refused, not ignored.
    let mut agent = t.db.start_agent(&state, &[], &dir.path("agent.log"));
    t.db.wait_applied(&sha, &mut agent);
    agent.stop();
    let out = run(&["--conntrack-size", "1000"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("--conntrack-size") && err.contains("262144"),
        "{err}"
    );
    still_enforced(&t, "after a refused size change");
}

#[test]
fn housekeeping_runs_while_the_state_keeps_changing() {
    if !require_root("housekeeping_runs_while_the_state_keeps_changing") {
        return;
    }
    let (_lab, db, web3) = Lab::db_and_web3();
    let dir = TempDir::new("busy");
    let state = dir.path("state.toml");
    // web3 is in the state but its interface is not on its host yet (another MAC).
    let base = format!(
        "{}\n[[interface]]\nid = \"eni-web3\"\nmac = \"02:5e:00:00:01:33\"\nipv4 = [\"198.18.1.13\"]\ngroups = [\"sg-0a00000000000web\"]\n",
        example("two-tier.toml")
    );
    let sha = write_state(&state, &base);
    let mut agent = web3.start_agent(&state, &[], &dir.path("agent.log"));
    web3.wait_applied(&sha, &mut agent);
    let _ = &db;
    // A writer that never pauses for 500 ms.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (stop, state, base) = (stop.clone(), state.clone(), base.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                write_state(&state, &format!("{base}\n# change {n}\n"));
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    // Hot plug: the interface takes the MAC of eni-web3 (the agent polls for it).
    web3.ns
        .ip(&["link", "set", "eth0", "address", "02:5e:00:00:01:33"]);
    wait_status(&web3, "the hot-plugged interface enforced", |st| {
        st["interfaces"].as_array().is_some_and(|a| {
            a.iter()
                .any(|i| i["network_interface"].as_str() == Some("eni-web3"))
        })
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.join().unwrap();
    agent.stop();
}

#[test]
fn pins_and_their_directories_are_private() {
    if !require_root("pins_and_their_directories_are_private") {
        return;
    }
    let (_lab, db, _web3) = Lab::db_and_web3();
    let dir = TempDir::new("perms");
    let state = dir.path("state.toml");
    let sha = write_state(&state, &example("two-tier.toml"));
    let mut agent = db.start_agent(&state, &["--log-format", "json"], &dir.path("agent.log"));
    db.wait_applied(&sha, &mut agent);
    // --log-format json: every log line is one JSON object.
    let log = agent.log_text();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(
        lines.iter().any(|l| l["level"] == "info"
            && l["message"]
                .as_str()
                .is_some_and(|m| m.contains("applied state"))),
        "{log}"
    );
    let out = db
        .cmd("sh")
        .args([
            "-c",
            "stat -c '%a %F %n' /sys/fs/bpf/sg /sys/fs/bpf/sg/links /sys/fs/bpf/sg/* /sys/fs/bpf/sg/links/*",
        ])
        .output()
        .expect("stat");
    let listing = String::from_utf8_lossy(&out.stdout).to_string();
    let mut seen = 0;
    for line in listing.lines() {
        let mode = line.split_whitespace().next().unwrap_or_default();
        let want = if line.contains("directory") {
            "700"
        } else {
            "600"
        };
        assert_eq!(mode, want, "{line}\n{listing}");
        seen += 1;
    }
    assert!(
        seen > 15,
        "every map pin, the links and the directories:\n{listing}"
    );
    agent.stop();
}
