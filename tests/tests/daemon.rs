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
    // The unit verifies against the installed tree, given the host's systemd targets and
    // the kill(1) that ExecReload= uses (what any real root has); they go again after.
    let unit = root.join("lib/systemd/system/sg-agent.service");
    let mut borrowed = vec![];
    for e in std::fs::read_dir("/lib/systemd/system").unwrap().flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if name.ends_with(".target") {
            let to = root.join("lib/systemd/system").join(&name);
            std::fs::copy(e.path(), &to).unwrap();
            borrowed.push(to);
        }
    }
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::copy("/bin/kill", root.join("bin/kill")).unwrap();
    borrowed.push(root.join("bin/kill"));
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
    for f in borrowed {
        std::fs::remove_file(f).unwrap();
    }
    let _ = std::fs::remove_dir(root.join("bin"));
    // Its exposure, as `systemd-analyze security` rates it.
    let security = Command::new("systemd-analyze")
        .args(["security", "--offline=yes"])
        .arg(&unit)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&security.stdout).to_string();
    let exposure: f64 = text
        .lines()
        .find_map(|l| l.split("sg-agent.service: ").nth(1))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|x| x.parse().ok())
        .unwrap_or_else(|| panic!("an exposure figure: {text}"));
    assert!(exposure <= 2.0, "exposure {exposure}: {text}");

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

/// A command in the container whose init is `pid`; its output, or a panic with it.
fn in_container(pid: u32, script: &str) -> String {
    let out = Command::new("nsenter")
        .args(["-t", &pid.to_string(), "-a", "--", "bash", "-c", script])
        .output()
        .expect("nsenter");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        let journal = Command::new("nsenter")
            .args([
                "-t",
                &pid.to_string(),
                "-a",
                "--",
                "journalctl",
                "-u",
                "sg-agent",
                "--no-pager",
                "-n",
                "30",
            ])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
            .unwrap_or_default();
        panic!("in the container: {script}\n{text}\nsg-agent's journal:\n{journal}");
    }
    text
}

/// A booted systemd-nspawn container of the Debian root `cargo xtask test` prepared, with a
/// bpffs of the host bound at /var/lib/sg-bpf; stopped and removed on drop.
struct Container {
    nspawn: std::process::Child,
    init: u32,
    _dir: TempDir,
    bpffs: PathBuf,
}

impl Container {
    fn boot(deb: &Path) -> Container {
        let image = PathBuf::from(std::env::var("SG_CONTAINER_ROOT").expect(
            "SG_CONTAINER_ROOT: a Debian root with systemd; `cargo xtask test` makes it with debootstrap",
        ));
        let dir = TempDir::new("nspawn");
        let root = dir.path("root");
        let st = Command::new("cp")
            .arg("-a")
            .arg(&image)
            .arg(&root)
            .status()
            .unwrap();
        assert!(st.success(), "copying the container root");
        std::fs::copy(deb, root.join("root/sg-agent.deb")).unwrap();
        let bpffs = dir.path("bpffs");
        std::fs::create_dir_all(&bpffs).unwrap();
        let st = Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(&bpffs)
            .status()
            .unwrap();
        assert!(st.success(), "mounting a bpffs for the container");
        let nspawn = Command::new("systemd-nspawn")
            .args([
                "-q",
                "-b",
                "--private-network",
                "--register=no",
                "--keep-unit",
            ])
            .arg("-D")
            .arg(&root)
            .arg(format!("--bind={}:/var/lib/sg-bpf", bpffs.display()))
            .arg("--capability=CAP_BPF,CAP_PERFMON,CAP_SYS_ADMIN,CAP_NET_ADMIN,CAP_SYS_RESOURCE")
            .arg("--system-call-filter=bpf perf_event_open")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path("nspawn.log")).unwrap())
            .spawn()
            .expect("systemd-nspawn (the bootstrap installs systemd-container)");
        // From here on, a failure stops the container (Drop).
        let mut c = Container {
            nspawn,
            init: 0,
            _dir: dir,
            bpffs,
        };
        // The container's init is the child of nspawn that runs systemd (an intermediate
        // child comes first and goes).
        let parent = c.nspawn.id();
        let init_of = || -> Option<u32> {
            let children =
                std::fs::read_to_string(format!("/proc/{parent}/task/{parent}/children")).ok()?;
            children
                .split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok())
                .find(|p| {
                    std::fs::read_to_string(format!("/proc/{p}/comm"))
                        .is_ok_and(|c| c.trim() == "systemd")
                })
        };
        let mut last = String::new();
        let booted = Instant::now();
        let mut init = 0;
        while booted.elapsed() < Duration::from_secs(90) {
            let Some(pid) = init_of() else {
                std::thread::sleep(Duration::from_millis(100));
                continue;
            };
            init = pid;
            c.init = pid;
            let out = Command::new("nsenter")
                .args([
                    "-t",
                    &init.to_string(),
                    "-a",
                    "--",
                    "systemctl",
                    "is-system-running",
                ])
                .output()
                .expect("nsenter");
            last = String::from_utf8_lossy(&out.stdout).trim().to_string();
            if matches!(last.as_str(), "running" | "degraded") {
                return c;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let jobs = Command::new("nsenter")
            .args([
                "-t",
                &init.to_string(),
                "-a",
                "--",
                "systemctl",
                "list-jobs",
                "--no-pager",
            ])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
            .unwrap_or_default();
        panic!("the container did not boot in 90 s (is-system-running: {last:?}); jobs:\n{jobs}");
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child: nspawn stops the container on SIGTERM.
        unsafe { libc::kill(self.nspawn.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.nspawn.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.nspawn.kill();
        let _ = self.nspawn.wait();
        let _ = Command::new("umount").arg(&self.bpffs).status();
    }
}

#[test]
fn the_unit_runs_under_a_real_systemd_and_the_package_upgrades_and_purges() {
    if !require_root("the_unit_runs_under_a_real_systemd_and_the_package_upgrades_and_purges") {
        return;
    }
    let c = Container::boot(&deb());
    let sh = |script: &str| in_container(c.init, script);
    sh("dpkg -i /root/sg-agent.deb");
    assert_eq!(sh("systemctl is-enabled sg-agent").trim(), "enabled");
    // Enabled, not started: there is no state yet.
    assert_eq!(
        sh("systemctl is-active sg-agent || true").trim(),
        "inactive",
        "no agent runs before a state exists"
    );
    // The database's interface, a state, and pins on the bound bpffs (the container's
    // /sys/fs/bpf is not a bpffs).
    sh("ip link add sg0 address 02:5e:00:00:02:01 type veth peer name sg1 \
        && ip netns add peer && ip link set sg1 netns peer \
        && ip netns exec peer ip link set sg1 up && ip netns exec peer ip addr add 198.18.200.1/16 dev sg1 \
        && ip link set sg0 up && ip addr add 198.18.2.21/16 dev sg0 \
        && mkdir -p /etc/sg /etc/systemd/system/sg-agent.service.d \
        && printf '[Service]\\nReadWritePaths=/var/lib/sg-bpf\\n' > /etc/systemd/system/sg-agent.service.d/pins.conf \
        && sed -i 's|^SG_AGENT_OPTS=.*|SG_AGENT_OPTS=\"--pin-dir /var/lib/sg-bpf/sg --run-dir /run/sg\"|' /etc/default/sg-agent \
        && cp /usr/share/doc/sg-agent/examples/two-tier.toml /etc/sg/state.toml \
        && systemctl daemon-reload");
    // Type=notify: start returns once the policy is enforced, with it in STATUS=.
    sh("systemctl start sg-agent");
    let show = sh("systemctl show sg-agent -p ActiveState -p SubState -p StatusText -p MainPID");
    assert!(
        show.contains("ActiveState=active") && show.contains("SubState=running"),
        "{show}"
    );
    assert!(
        show.contains("enforcing 1 interface(s): sg0 (eni-000000000000000db)"),
        "the hardened unit enforces the interface: {show}"
    );
    let pid1: String = show
        .lines()
        .find_map(|l| l.strip_prefix("MainPID="))
        .unwrap()
        .to_string();
    let status = sh("sg-agent status --pin-dir /var/lib/sg-bpf/sg --json");
    let v: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(
        v["interfaces"][0]["network_interface"], "eni-000000000000000db",
        "{status}"
    );
    // reload: RELOADING=1 … READY=1, and still active.
    sh("systemctl reload sg-agent");
    assert!(sh("journalctl -u sg-agent --no-pager").contains("SIGHUP: re-reading"));
    assert_eq!(sh("systemctl is-active sg-agent").trim(), "active");
    // Upgrade: the package again; the new agent adopts the pins.
    sh("dpkg -i /root/sg-agent.deb");
    let show = sh("systemctl show sg-agent -p ActiveState -p MainPID -p StatusText");
    assert!(show.contains("ActiveState=active"), "{show}");
    assert!(
        !show.contains(&format!("MainPID={pid1}\n")),
        "a new agent runs: {show}"
    );
    assert!(show.contains("enforcing 1 interface(s)"), "{show}");
    assert!(
        sh("journalctl -u sg-agent --no-pager").contains("adopted pinned state"),
        "the upgraded agent adopts what is pinned"
    );
    // Stop: enforcement stays (pins and links in place).
    sh("systemctl stop sg-agent");
    assert!(
        !sh("ls /var/lib/sg-bpf/sg/links").trim().is_empty(),
        "links stay pinned after a stop"
    );
    // The programs still enforce: from the peer's namespace a SYN to the database's
    // closed port 3306 is dropped (the attempt times out) rather than refused.
    let probe = || -> String {
        sh("ip netns exec peer timeout 2 bash -c 'exec 3<>/dev/tcp/198.18.2.21/3306' 2>&1; echo rc=$?")
    };
    let enforced = probe();
    assert!(
        enforced.contains("rc=124"),
        "dropped while enforced: {enforced}"
    );
    // ... until purge: the pins go, and with them the programs.
    sh("dpkg -P sg-agent");
    let left = sh("ls -A /var/lib/sg-bpf/");
    assert!(
        !left.lines().any(|l| l == "sg"),
        "purge removed the pins: {left}"
    );
    let after = probe();
    assert!(
        after.contains("refused"),
        "purge detached the programs: {after}"
    );
}
