//! The command line contract of SPEC §5, run as a user would.

use std::{process::Command, time::Duration};

use sg_tests::{
    lab::{agent_bin, tcp, write_state, Lab, TempDir},
    privileges::require_root,
    wait_for,
};

fn example(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(name)
}

fn sg(args: &[&str]) -> std::process::Output {
    Command::new(agent_bin())
        .args(args)
        .output()
        .expect("running sg-agent")
}

#[test]
fn bad_usage_exits_64_and_help_is_readable() {
    for args in [
        &["bogus"][..],
        &["run"],
        &["run", "--state"],
        &["validate", "--nope"],
        &["explain", "--state", "x"],
        &["run", "--state", "x", "--ingress-hook", "ebpf"],
        &["run", "--state", "x", "--attach", "eth0"],
    ] {
        let out = sg(args);
        assert_eq!(
            out.status.code(),
            Some(64),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for args in [
        &["--help"][..],
        &["run", "--help"],
        &["explain", "--help"],
        &["status", "--help"],
        &["flows", "--help"],
        &["detach", "--help"],
        &["validate", "--help"],
    ] {
        let out = sg(args);
        assert_eq!(out.status.code(), Some(0), "{args:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("Usage:"), "{args:?}: {text}");
    }
    let run_help = String::from_utf8_lossy(&sg(&["run", "--help"]).stdout).to_string();
    for flag in [
        "--state",
        "--attach",
        "--pin-dir",
        "--ingress-hook",
        "--default-deny",
        "--revalidate",
        "--api",
    ] {
        assert!(run_help.contains(flag), "run --help documents {flag}");
    }
}

#[test]
fn validate_and_explain() {
    let ok = sg(&[
        "validate",
        "--state",
        example("two-tier.toml").to_str().unwrap(),
    ]);
    assert_eq!(ok.status.code(), Some(0));
    let ok = sg(&[
        "validate",
        "--state",
        example("two-tier.json").to_str().unwrap(),
    ]);
    assert_eq!(ok.status.code(), Some(0));
    let dir = TempDir::new("cli-validate");
    let bad = dir.path("bad.toml");
    std::fs::write(&bad, "[[security_group]]\nid = \"sg-a\"\ningress = [{ protocol = \"tcp\", ports = \"9-1\", from = [\"sg-b\"] }]\n").unwrap();
    let out = sg(&["validate", "--state", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("ingress[0].ports") && err.contains("ingress[0].from[0]"),
        "every error: {err}"
    );

    let state = example("two-tier.toml");
    let explain = |args: &[&str]| {
        let mut all = vec!["explain", "--state", state.to_str().unwrap()];
        all.extend_from_slice(args);
        let out = sg(&all);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let allow = explain(&[
        "--eni",
        "eni-000000000000000db",
        "--direction",
        "ingress",
        "--protocol",
        "tcp",
        "--remote",
        "198.18.1.11",
        "--port",
        "3306",
    ]);
    assert!(
        allow.starts_with("ALLOW")
            && allow.contains("sg-0a000000000000db")
            && allow.contains("db-sg")
            && allow.contains("3306"),
        "{allow}"
    );
    let deny = explain(&[
        "--eni",
        "eni-000000000000000db",
        "--direction",
        "ingress",
        "--protocol",
        "tcp",
        "--remote",
        "198.18.9.9",
        "--port",
        "3306",
    ]);
    assert!(deny.starts_with("DENY"), "{deny}");
    let egress = explain(&[
        "--eni",
        "eni-0000000000000web1",
        "--direction",
        "egress",
        "--protocol",
        "udp",
        "--remote",
        "2001:db8::53",
        "--port",
        "53",
    ]);
    assert!(egress.starts_with("ALLOW"), "{egress}");
    let icmp = explain(&[
        "--eni",
        "eni-0000000000000web1",
        "--direction",
        "ingress",
        "--protocol",
        "icmp",
        "--remote",
        "198.18.9.9",
        "--icmp-type",
        "8",
        "--icmp-code",
        "0",
    ]);
    assert!(icmp.starts_with("DENY"), "{icmp}");
    // Bad usage, before the file is read: exit 64 with the reason.
    let state = example("two-tier.toml");
    for (args, says) in [
        (
            &["--protocol", "tcp", "--remote", "198.18.1.1"][..],
            "--port is required",
        ),
        (
            &["--protocol", "udp", "--remote", "198.18.1.1"][..],
            "--port is required",
        ),
        (
            &[
                "--protocol",
                "icmp",
                "--remote",
                "198.18.1.1",
                "--port",
                "8",
            ][..],
            "does not apply",
        ),
        (
            &[
                "--protocol",
                "icmp",
                "--remote",
                "2001:db8::1",
                "--icmp-type",
                "8",
            ][..],
            "icmpv6",
        ),
        (
            &[
                "--protocol",
                "icmpv6",
                "--remote",
                "198.18.1.1",
                "--icmp-type",
                "128",
            ][..],
            "IPv4",
        ),
        (
            &[
                "--protocol",
                "tcp",
                "--remote",
                "198.18.1.1",
                "--port",
                "1",
                "--icmp-type",
                "8",
            ][..],
            "--icmp-type",
        ),
    ] {
        let mut all = vec![
            "explain",
            "--state",
            state.to_str().unwrap(),
            "--eni",
            "eni-000000000000000db",
            "--direction",
            "ingress",
        ];
        all.extend_from_slice(args);
        let out = sg(&all);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
}

#[test]
fn run_status_flows_hot_plug_sighup_api_and_detach() {
    if !require_root("run_status_flows_hot_plug_sighup_api_and_detach") {
        return;
    }
    let mut lab = Lab::new();
    let db = lab.host(
        "db",
        "02:5e:00:00:02:01",
        &["198.18.2.21/16", "2001:db8:2::21/32"],
    );
    let web1 = lab.host(
        "web1",
        "02:5e:00:00:01:01",
        &["198.18.1.11/16", "2001:db8:1::11/32"],
    );
    tcp::echo_server(&db.ns, "[::]:3306");
    tcp::echo_server(&db.ns, "[::]:4000");
    wait_for("the lab", Duration::from_secs(10), || {
        tcp::reaches(&web1.ns, "198.18.2.21:4000").then_some(())
    });
    let dir = TempDir::new("cli-run");
    let state = dir.path("state.json");
    let text = std::fs::read_to_string(example("two-tier.json")).unwrap();
    let sha = write_state(&state, &text);
    let mut agent = db.start_agent(&state, &["--api", "127.0.0.1:9464"], &dir.path("db.log"));
    db.wait_applied(&sha, &mut agent);

    // Pins: 0600 files in a 0700 directory.
    let pins = db
        .cmd("stat")
        .args([
            "-c",
            "%a %n",
            "/sys/fs/bpf/sg",
            "/sys/fs/bpf/sg/SG_CT_V2",
            "/sys/fs/bpf/sg/links",
        ])
        .output()
        .unwrap();
    let pins = String::from_utf8_lossy(&pins.stdout).to_string();
    assert!(
        pins.contains("700 /sys/fs/bpf/sg\n") && pins.contains("600 /sys/fs/bpf/sg/SG_CT_V2"),
        "{pins}"
    );

    assert!(tcp::reaches(&web1.ns, "198.18.2.21:3306"));
    assert!(!tcp::reaches(&web1.ns, "198.18.2.21:4000"));
    let st = db.status().unwrap();
    let iface = &st["interfaces"][0];
    assert_eq!(iface["network_interface"], "eni-000000000000000db", "{st}");
    assert!(
        iface["counters"]["ingress"]["allowed_new"]
            .as_u64()
            .unwrap()
            >= 1,
        "{st}"
    );
    assert!(
        iface["counters"]["ingress"]["dropped_policy"]
            .as_u64()
            .unwrap()
            >= 1,
        "{st}"
    );
    assert_eq!(st["agent_running"], true);
    assert_eq!(st["last_error"], serde_json::Value::Null);
    // One versioned document, each field once (no nested copy of the agent's own).
    assert_eq!(st["schema_version"], 2, "{st}");
    assert!(
        st.get("agent").is_none(),
        "no duplicated agent document: {st}"
    );
    assert_eq!(
        st["interfaces"][0]["groups"][0], "sg-0a000000000000db",
        "each interface's groups: {st}"
    );
    let human = db.cmd(agent_bin()).arg("status").output().unwrap();
    let human = String::from_utf8_lossy(&human.stdout).to_string();
    assert!(human.contains(&sha), "{human}");
    assert!(
        human.contains("groups   sg-0a000000000000db"),
        "human status lists the groups: {human}"
    );

    let mut conn =
        tcp::connect(&web1.ns, "198.18.2.21:3306", None, Duration::from_secs(1)).unwrap();
    assert!(tcp::echo_ok(&mut conn));
    let flows = db
        .cmd(agent_bin())
        .args(["flows", "--json"])
        .output()
        .unwrap();
    let flows: serde_json::Value = serde_json::from_slice(&flows.stdout).unwrap();
    let found = flows.as_array().unwrap().iter().any(|f| {
        f["remote"] == "198.18.1.11"
            && f["local_port"] == 3306
            && f["tcp_state"] == "established"
            && f["origin"] == "ingress"
    });
    assert!(found, "the connection is listed as a flow: {flows}");
    // Human flows: aligned columns, and IPv6 endpoints as [addr]:port.
    let mut conn6 = tcp::connect(
        &web1.ns,
        "[2001:db8:2::21]:3306",
        None,
        Duration::from_secs(2),
    )
    .expect("web1 → db over IPv6");
    assert!(tcp::echo_ok(&mut conn6));
    let table = db.cmd(agent_bin()).arg("flows").output().unwrap();
    let table = String::from_utf8_lossy(&table.stdout).to_string();
    let header = table.lines().next().unwrap_or_default();
    let remote_col = header.find("remote").expect("a remote column");
    for line in table.lines().skip(1) {
        assert!(
            line.len() > remote_col && line.as_bytes()[remote_col - 1] == b' ',
            "columns align:\n{table}"
        );
    }
    assert!(table.contains("[2001:db8:2::21]:3306"), "{table}");
    let none = Command::new(agent_bin())
        .args(["flows", "--pin-dir", "/nonexistent/sg"])
        .output()
        .unwrap();
    assert_eq!(none.status.code(), Some(1), "flows with no pins");
    assert!(String::from_utf8_lossy(&none.stderr).contains("no pins"));

    // The API, only because --api asked for it.
    let api = db.cmd("bash").args(["-c", "exec 3<>/dev/tcp/127.0.0.1/9464; printf 'GET /status HTTP/1.0\\r\\n\\r\\n' >&3; cat <&3"]).output().unwrap();
    assert!(
        String::from_utf8_lossy(&api.stdout).contains(&sha),
        "{}",
        String::from_utf8_lossy(&api.stdout)
    );

    // Hot plug: an interface that appears later with a MAC of the state is enforced.
    db.ns.ip(&[
        "link",
        "add",
        "eth9",
        "address",
        "02:5e:00:00:01:02",
        "type",
        "veth",
        "peer",
        "name",
        "eth9p",
    ]);
    db.ns.ip(&["link", "set", "eth9", "up"]);
    db.ns.ip(&["link", "set", "eth9p", "up"]);
    wait_for(
        "the new interface to be enforced",
        Duration::from_secs(10),
        || {
            let st = db.status()?;
            (st["interfaces"].as_array()?.len() == 2).then_some(())
        },
    );

    // ... and one that vanishes is forgotten: no interface entry, no link pins.
    let eth9 = db.ns.ifindex("eth9");
    db.ns.ip(&["link", "del", "eth9"]);
    wait_for(
        "the vanished interface to be forgotten",
        Duration::from_secs(10),
        || {
            let st = db.status()?;
            (st["interfaces"].as_array()?.len() == 1).then_some(())
        },
    );
    let pins = db.cmd("ls").arg("/sys/fs/bpf/sg/links").output().unwrap();
    let pins = String::from_utf8_lossy(&pins.stdout).to_string();
    assert!(
        !pins.contains(&format!("{eth9}-")),
        "link pins of the vanished interface removed: {pins}"
    );

    // SIGHUP re-reads the state.
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(agent.child.id() as i32, libc::SIGHUP) };
    wait_for("SIGHUP in the log", Duration::from_secs(5), || {
        agent.log_text().contains("SIGHUP").then_some(())
    });

    // Detach removes programs, links and pins.
    agent.stop();
    let out = db.cmd(agent_bin()).arg("detach").output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!db
        .cmd("test")
        .args(["-e", "/sys/fs/bpf/sg"])
        .status()
        .unwrap()
        .success());
    wait_for("detach", Duration::from_secs(5), || {
        tcp::reaches(&web1.ns, "198.18.2.21:4000").then_some(())
    });
}

#[test]
fn completions_man_page_and_a_version_that_names_its_build() {
    for shell in ["bash", "zsh", "fish"] {
        let out = sg(&["completions", shell]);
        assert_eq!(out.status.code(), Some(0), "completions {shell}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("sg-agent") && text.contains("validate"),
            "{shell}: {text}"
        );
    }
    assert_eq!(sg(&["completions", "tcsh"]).status.code(), Some(64));
    let man = sg(&["man"]);
    assert_eq!(man.status.code(), Some(0));
    let man = String::from_utf8_lossy(&man.stdout);
    assert!(
        man.contains(".TH sg-agent 1") && man.contains("validate"),
        "{man}"
    );
    let v = String::from_utf8_lossy(&sg(&["--version"]).stdout).to_string();
    // `sg-agent 0.1.0 (commit 0123456789ab, eBPF object sha256 <64 hex>)`
    let commit = v
        .split("commit ")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .unwrap_or_default();
    assert!(
        commit.len() == 12 && commit.chars().all(|c| c.is_ascii_hexdigit()),
        "--version names the commit: {v}"
    );
    let object = v
        .split("sha256 ")
        .nth(1)
        .map(|r| r.trim().trim_end_matches(')'))
        .unwrap_or_default();
    assert!(
        object.len() == 64 && object.chars().all(|c| c.is_ascii_hexdigit()),
        "--version names the eBPF object: {v}"
    );
    let help = String::from_utf8_lossy(&sg(&["--help"]).stdout).to_string();
    assert!(
        help.contains("RUST_LOG"),
        "--help documents RUST_LOG: {help}"
    );
}
