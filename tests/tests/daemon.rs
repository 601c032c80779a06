//! sg-agent as a system daemon: the systemd notification protocol (readiness only once
//! the policy is enforced, status lines, reload and stop, the watchdog), and the Debian
//! package installed, upgraded, removed and purged in a root of its own.

use std::{
    os::unix::net::UnixDatagram,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use sg_tests::{
    lab::{agent_bin, example, tcp, write_state, Lab, TempDir},
    privileges::require_root,
};

/// Messages the agent sent to our notification socket, each as its lines.
fn receive(sock: &UnixDatagram, until: Duration) -> Vec<String> {
    let deadline = Instant::now() + until;
    let mut out = vec![];
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        sock.set_read_timeout(Some(deadline - Instant::now()))
            .unwrap();
        match sock.recv(&mut buf) {
            Ok(n) => out.push(String::from_utf8_lossy(&buf[..n]).to_string()),
            Err(_) => break,
        }
        if !out.is_empty() {
            break;
        }
    }
    out
}

/// Waits for a message with `field` (e.g. "READY=1"); returns it.
fn wait_message(sock: &UnixDatagram, field: &str, within: Duration) -> String {
    let deadline = Instant::now() + within;
    let mut seen = vec![];
    while Instant::now() < deadline {
        for m in receive(sock, deadline - Instant::now()) {
            if m.lines().any(|l| l == field) {
                return m;
            }
            seen.push(m);
        }
    }
    panic!("no {field} within {within:?}; got {seen:?}");
}

#[test]
fn readiness_status_reload_watchdog_and_stop_follow_the_systemd_protocol() {
    if !require_root("readiness_status_reload_watchdog_and_stop_follow_the_systemd_protocol") {
        return;
    }
    let t = Lab::two_tier();
    let dir = TempDir::new("notify");
    let state = dir.path("state.toml");
    let sha = write_state(&state, &example("two-tier.toml"));
    let socket_path = dir.path("notify.sock");
    let sock = UnixDatagram::bind(&socket_path).expect("notify socket");
    let mut agent =
        t.db.cmd(agent_bin())
            .args(["run", "--state"])
            .arg(&state)
            .env("NOTIFY_SOCKET", &socket_path)
            .env("WATCHDOG_USEC", "400000")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path("db.log")).unwrap())
            .spawn()
            .expect("sg-agent");
    // READY=1 comes once the policy is enforced: at that moment the database is already
    // closed to the outsider and open to web1.
    let ready = wait_message(&sock, "READY=1", Duration::from_secs(20));
    assert!(
        !tcp::reaches(&t.outsider.ns, "198.18.2.21:3306"),
        "enforced when READY=1 is sent"
    );
    assert!(tcp::reaches(&t.web1.ns, "198.18.2.21:3306"));
    assert!(
        ready.contains(&format!(
            "STATUS=state {} applied; enforcing 1 interface(s): eth0 (eni-000000000000000db)",
            &sha[..12]
        )),
        "{ready}"
    );
    assert!(
        ready.contains(&format!("MAINPID={}", agent.id())),
        "{ready}"
    );
    // The watchdog keep-alive, at half the interval.
    wait_message(&sock, "WATCHDOG=1", Duration::from_secs(2));
    // SIGHUP: RELOADING=1, then READY=1 again.
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(agent.id() as i32, libc::SIGHUP) };
    wait_message(&sock, "RELOADING=1", Duration::from_secs(5));
    wait_message(&sock, "READY=1", Duration::from_secs(5));
    // An invalid state: STATUS names the error, enforcement goes on.
    std::fs::write(&state, "[[security_group]]\nid = 5\n").unwrap();
    let status = wait_message_containing(&sock, "last error", Duration::from_secs(10));
    assert!(status.contains("STATUS="), "{status}");
    assert!(!tcp::reaches(&t.outsider.ns, "198.18.2.21:3306"));
    // SIGTERM: STOPPING=1.
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(agent.id() as i32, libc::SIGTERM) };
    wait_message(&sock, "STOPPING=1", Duration::from_secs(5));
    assert!(agent.wait().unwrap().success());
}

fn wait_message_containing(sock: &UnixDatagram, text: &str, within: Duration) -> String {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        for m in receive(sock, deadline - Instant::now()) {
            if m.contains(text) {
                return m;
            }
        }
    }
    panic!("no message containing {text:?} within {within:?}");
}

/// The package `cargo xtask test` built (`cargo xtask package`).
fn deb() -> PathBuf {
    PathBuf::from(std::env::var("SG_DEB").expect(
        "SG_DEB: the .deb under test; `cargo xtask test` builds it with `cargo xtask package`",
    ))
}

fn dpkg(root: &Path, args: &[&str]) -> std::process::Output {
    let out = Command::new("dpkg")
        .arg(format!("--root={}", root.display()))
        .args([
            "--force-script-chrootless",
            "--force-depends",
            "--no-triggers",
        ])
        .args(args)
        .env("DPKG_ROOT", root)
        .output()
        .expect("dpkg");
    assert!(
        out.status.success(),
        "dpkg {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Every file under `root`, relative, except dpkg's own database.
fn files_under(root: &Path) -> Vec<String> {
    let mut out = vec![];
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().to_string();
            if rel.starts_with("var/lib/dpkg") || rel.starts_with("var/log/dpkg") {
                continue;
            }
            if e.file_type().unwrap().is_dir() {
                stack.push(p);
            } else {
                out.push(rel);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn the_package_installs_upgrades_removes_and_purges_cleanly() {
    if !require_root("the_package_installs_upgrades_removes_and_purges_cleanly") {
        return;
    }
    let deb = deb();
    let dir = TempDir::new("deb");
    let root = dir.path("root");
    for d in [
        "var/lib/dpkg/info",
        "var/lib/dpkg/updates",
        "var/lib/dpkg/triggers",
    ] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::write(root.join("var/lib/dpkg/status"), "").unwrap();
    let info = Command::new("dpkg-deb")
        .arg("--info")
        .arg(&deb)
        .output()
        .unwrap();
    let info = String::from_utf8_lossy(&info.stdout).to_string();
    assert!(
        info.contains("Package: sg-agent") && info.contains("postinst"),
        "{info}"
    );

    dpkg(&root, &["--install", deb.to_str().unwrap()]);
    let files = files_under(&root);
    for want in [
        "usr/bin/sg-agent",
        "lib/systemd/system/sg-agent.service",
        "etc/default/sg-agent",
        "usr/share/man/man1/sg-agent.1.gz",
        "usr/share/bash-completion/completions/sg-agent",
        "usr/share/zsh/vendor-completions/_sg-agent",
        "usr/share/fish/vendor_completions.d/sg-agent.fish",
        "usr/share/doc/sg-agent/README.md",
        "usr/share/doc/sg-agent/copyright",
        "usr/share/doc/sg-agent/examples/two-tier.toml",
        "usr/share/doc/sg-agent/examples/api.conf",
        "etc/systemd/system/multi-user.target.wants/sg-agent.service",
    ] {
        assert!(
            files.iter().any(|f| f == want),
            "{want} installed: {files:#?}"
        );
    }
    // The installed binary names its version, commit and eBPF object.
    let version = Command::new(root.join("usr/bin/sg-agent"))
        .arg("--version")
        .output()
        .unwrap();
    let version = String::from_utf8_lossy(&version.stdout).to_string();
    assert!(
        version.starts_with("sg-agent ")
            && version.contains("commit ")
            && version.contains("eBPF object sha256 "),
        "{version}"
    );
    // The man page and completions are real.
    let man = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "gzip -dc {}",
            root.join("usr/share/man/man1/sg-agent.1.gz").display()
        ))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&man.stdout).contains(".TH sg-agent"));
    let bash = std::fs::read_to_string(root.join("usr/share/bash-completion/completions/sg-agent"))
        .unwrap();
    assert!(
        bash.contains("complete") && bash.contains("policy"),
        "bash completion"
    );
    // The unit verifies against the installed tree.
    let unit = root.join("lib/systemd/system/sg-agent.service");
    let verify = Command::new("systemd-analyze")
        .arg(format!("--root={}", root.display()))
        .args(["verify", "--man=no"])
        .arg(&unit)
        .output()
        .unwrap();
    assert!(
        verify.status.success() && verify.stderr.is_empty(),
        "systemd-analyze verify: {}",
        String::from_utf8_lossy(&verify.stderr)
    );

    // An upgrade (the same package again) keeps the operator's edit of the conffile.
    let default = root.join("etc/default/sg-agent");
    let edited =
        std::fs::read_to_string(&default).unwrap() + "SG_AGENT_OPTS=\"$SG_AGENT_OPTS --audit\"\n";
    std::fs::write(&default, &edited).unwrap();
    dpkg(
        &root,
        &["--force-confold", "--install", deb.to_str().unwrap()],
    );
    assert_eq!(std::fs::read_to_string(&default).unwrap(), edited);

    // Remove: everything but the conffile goes. Purge: nothing is left.
    dpkg(&root, &["--remove", "sg-agent"]);
    assert_eq!(files_under(&root), vec!["etc/default/sg-agent".to_string()]);
    dpkg(&root, &["--purge", "sg-agent"]);
    assert_eq!(files_under(&root), Vec::<String>::new());
    let dirs: Vec<_> = ["etc/sg", "usr/share/doc/sg-agent", "lib/systemd/system"]
        .iter()
        .filter(|d| root.join(d).exists())
        .collect();
    assert!(dirs.is_empty(), "directories left: {dirs:?}");
}
