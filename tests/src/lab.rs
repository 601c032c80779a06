//! A lab of hosts: namespaces joined by a bridge (in a switch namespace of its own), each
//! host with one interface `eth0` of a chosen MAC and addresses, and real `sg-agent`
//! processes run inside a long-lived holder of a host's namespaces (SPEC §6 note: a bpffs
//! mounted inside `ip netns exec` vanishes with the command; inside the holder it lives
//! as long as the host).

use std::{
    fs::File,
    io::Read,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use crate::{
    netns::{run, Netns},
    wait_for,
};

/// The agent binary under test: `SG_AGENT_BIN` (set by `cargo xtask test`), else the
/// release build in this workspace.
pub fn agent_bin() -> PathBuf {
    std::env::var_os("SG_AGENT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/sg-agent"))
}

pub struct Lab {
    pub switch: Netns,
    next_port: u32,
}

/// A host: a namespace with `eth0` on the lab bridge, and a holder process whose mount
/// namespace keeps the host's bpffs.
pub struct Host {
    pub ns: Netns,
    holder: Child,
    pub name: String,
}

impl Lab {
    pub fn new() -> Lab {
        let switch = Netns::new("sw");
        switch.ip(&["link", "add", "br0", "type", "bridge"]);
        switch.ip(&["link", "set", "br0", "up"]);
        Lab {
            switch,
            next_port: 0,
        }
    }

    /// Adds a host with `eth0` (MAC `mac`) and addresses in CIDR notation.
    pub fn host(&mut self, name: &str, mac: &str, addrs: &[&str]) -> Host {
        let ns = Netns::new(name);
        self.next_port += 1;
        let port = format!("p{}", self.next_port);
        run(Command::new("ip").args([
            "link",
            "add",
            "eth0",
            "netns",
            ns.name(),
            "address",
            mac,
            "type",
            "veth",
            "peer",
            "name",
            &port,
            "netns",
            self.switch.name(),
        ]));
        self.switch
            .ip(&["link", "set", &port, "master", "br0", "up"]);
        for a in addrs {
            let mut args = vec!["addr", "add", a, "dev", "eth0"];
            if a.contains(':') {
                args.push("nodad");
            }
            ns.ip(&args);
        }
        ns.ip(&["link", "set", "eth0", "up"]);
        Host::new(ns, name)
    }
}

/// MAC addresses of the two-tier hosts, as in `examples/two-tier.*`.
pub const WEB1_MAC: &str = "02:5e:00:00:01:01";
pub const DB_MAC: &str = "02:5e:00:00:02:01";
pub const WEB3_MAC: &str = "02:5e:00:00:01:03";

/// web1, db, an outsider and an administrator on one bridge, servers listening.
pub struct TwoTier {
    pub lab: Lab,
    pub web1: Host,
    pub db: Host,
    pub outsider: Host,
    pub admin: Host,
}

impl Lab {
    /// The seed's two tiers (examples/two-tier.*): web1 and db with their MACs, an
    /// outsider and an administrator; db listens on 3306 and 9999, web1 on 80 and 22, the
    /// outsider on 7777. Returns once the lab is reachable end to end.
    pub fn two_tier() -> TwoTier {
        let mut lab = Lab::new();
        let web1 = lab.host("web1", WEB1_MAC, &["198.18.1.11/16", "2001:db8:1::11/32"]);
        let db = lab.host("db", DB_MAC, &["198.18.2.21/16", "2001:db8:2::21/32"]);
        let outsider = lab.host(
            "out",
            "02:5e:00:00:09:09",
            &["198.18.200.1/16", "2001:db8:200::1/32"],
        );
        let admin = lab.host(
            "adm",
            "02:5e:00:00:09:0a",
            &["198.18.100.10/16", "2001:db8:100::10/32"],
        );
        tcp::echo_server(&db.ns, "[::]:3306");
        tcp::echo_server(&db.ns, "[::]:9999");
        tcp::echo_server(&web1.ns, "[::]:80");
        tcp::echo_server(&web1.ns, "[::]:22");
        tcp::echo_server(&outsider.ns, "[::]:7777");
        wait_for("the lab", Duration::from_secs(10), || {
            tcp::reaches(&outsider.ns, "198.18.2.21:9999").then_some(())
        });
        TwoTier {
            lab,
            web1,
            db,
            outsider,
            admin,
        }
    }

    /// A database server (listening on 3306) and a web server `web3` that is not in the
    /// two-tier state yet. Returns once web3 reaches the database.
    pub fn db_and_web3() -> (Lab, Host, Host) {
        let mut lab = Lab::new();
        let db = lab.host("db", DB_MAC, &["198.18.2.21/16"]);
        let web3 = lab.host("web3", WEB3_MAC, &["198.18.1.13/16"]);
        tcp::echo_server(&db.ns, "[::]:3306");
        wait_for("the lab", Duration::from_secs(10), || {
            tcp::reaches(&web3.ns, "198.18.2.21:3306").then_some(())
        });
        (lab, db, web3)
    }
}

impl Default for Lab {
    fn default() -> Self {
        Self::new()
    }
}

impl Host {
    /// A host for an existing namespace: starts its holder.
    pub fn new(ns: Netns, name: &str) -> Host {
        let holder = ns
            .cmd("sleep")
            .arg("100000")
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting holder of {name}: {e}"));
        // The holder has entered the namespace once its mount namespace differs from ours.
        let pid = holder.id();
        let mine = std::fs::read_link("/proc/self/ns/mnt").ok();
        wait_for("the namespace holder", Duration::from_secs(5), || {
            let theirs = std::fs::read_link(format!("/proc/{pid}/ns/mnt")).ok();
            (theirs.is_some() && theirs != mine).then_some(())
        });
        Host {
            ns,
            holder,
            name: name.to_string(),
        }
    }

    /// A command run inside the host's network and mount namespaces.
    pub fn cmd(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        c.args(["-t", &self.holder.id().to_string(), "-n", "-m", "--"])
            .arg(program);
        c
    }

    /// Starts `sg-agent run --state STATE --pin-dir /sys/fs/bpf/sg ARGS…`, logging to
    /// `log` (stderr).
    pub fn start_agent(&self, state: &Path, args: &[&str], log: &Path) -> AgentProc {
        let state = state.to_str().expect("state path");
        let mut all = vec!["--state", state];
        all.extend_from_slice(args);
        self.run_agent(&all, log)
    }

    /// Starts `sg-agent run ARGS…` (a state source among them), logging to `log`.
    pub fn run_agent(&self, args: &[&str], log: &Path) -> AgentProc {
        let log_file = File::create(log).expect("agent log");
        let child = self
            .cmd(agent_bin())
            .arg("run")
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .unwrap_or_else(|e| panic!("starting sg-agent on {}: {e}", self.name));
        AgentProc {
            child,
            log: log.to_path_buf(),
        }
    }

    /// `sg-agent status --json` inside the host.
    pub fn status(&self) -> Option<serde_json::Value> {
        let out = self
            .cmd(agent_bin())
            .args(["status", "--json"])
            .output()
            .ok()?;
        serde_json::from_slice(&out.stdout).ok()
    }

    /// Waits until this agent process's own status (not one an earlier agent left)
    /// satisfies `done`; panics with the agent's log if it exits first.
    fn wait_status(
        &self,
        what: &str,
        agent: &mut AgentProc,
        done: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        // A start is mostly verifying three programs; several agents starting at once on
        // a busy 2-core VM took over 20 s (one alone took 11 s on such a day).
        wait_for(
            &format!("{} to {what}", self.name),
            Duration::from_secs(90),
            || {
                if let Ok(Some(st)) = agent.child.try_wait() {
                    panic!(
                        "sg-agent on {} exited ({st}):\n{}",
                        self.name,
                        agent.log_text()
                    );
                }
                let s = self.status()?;
                let mine = s["agent_pid"].as_u64() == Some(agent.child.id() as u64);
                (mine && done(&s)).then_some(s)
            },
        )
    }

    /// Waits until the agent reports `sha256` as applied.
    pub fn wait_applied(&self, sha256: &str, agent: &mut AgentProc) {
        self.wait_status(&format!("apply state {}", &sha256[..12]), agent, |s| {
            s["applied_state_sha256"].as_str() == Some(sha256)
        });
    }

    /// Waits until the agent reports etcd's `revision` (or a later one) as applied.
    pub fn wait_revision(&self, revision: i64, agent: &mut AgentProc) -> serde_json::Value {
        self.wait_status(&format!("apply etcd revision {revision}"), agent, |s| {
            s["source"]["applied_revision"]
                .as_i64()
                .is_some_and(|r| r >= revision)
        })
    }

    pub fn ping(&self, addr: &str) -> bool {
        self.ns.ping(addr, 56, 1)
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

/// A running agent, killed on drop.
pub struct AgentProc {
    pub child: Child,
    pub log: PathBuf,
}

impl AgentProc {
    pub fn log_text(&self) -> String {
        let mut s = String::new();
        let _ = File::open(&self.log).and_then(|mut f| f.read_to_string(&mut s));
        s
    }

    /// SIGKILL, as a crash would.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A scratch directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("sg-test-{}-{n}-{tag}", std::process::id()));
        std::fs::create_dir_all(&p).expect("temp dir");
        TempDir(p)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes a state file atomically (write, then rename over), returning its SHA-256.
pub fn write_state(path: &Path, text: &str) -> String {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("writing state");
    std::fs::rename(&tmp, path).expect("renaming state");
    sg_agent::source::sha256_hex(text.as_bytes())
}

/// TCP helpers over real sockets.
pub mod tcp {
    use std::{
        io::{Read, Write},
        net::{SocketAddr, TcpListener, TcpStream},
        time::Duration,
    };

    use crate::netns::Netns;

    /// Echo server: every connection gets back what it sends, forever, on threads.
    pub fn echo_server(ns: &Netns, addr: &str) {
        let listener: TcpListener = ns.tcp_listen(addr.parse().expect("listen address"));
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut conn = conn;
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = conn.read(&mut buf) {
                        if n == 0 || conn.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        });
    }

    /// Connects from `ns` (optionally from `source`) within `timeout`.
    pub fn connect(
        ns: &Netns,
        addr: &str,
        source: Option<&str>,
        timeout: Duration,
    ) -> std::io::Result<TcpStream> {
        let addr: SocketAddr = addr.parse().expect("address");
        match source {
            None => ns.tcp_connect(addr, timeout),
            Some(src) => {
                let src: std::net::IpAddr = src.parse().expect("source");
                ns.enter(|| {
                    let domain = if addr.is_ipv4() {
                        libc::AF_INET
                    } else {
                        libc::AF_INET6
                    };
                    bind_connect(domain, src, addr, timeout)
                })
            }
        }
    }

    fn bind_connect(
        domain: i32,
        src: std::net::IpAddr,
        dst: SocketAddr,
        timeout: Duration,
    ) -> std::io::Result<TcpStream> {
        use std::os::fd::FromRawFd;
        // SAFETY: a fresh socket we own; converted into a TcpListener-free TcpStream after
        // a blocking bind. Connect with timeout is done by std on the converted stream.
        let fd = unsafe { libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let bind_addr = SocketAddr::new(src, 0);
        let (storage, len) = sockaddr(&bind_addr);
        // SAFETY: storage holds a valid sockaddr of `len` bytes.
        if unsafe { libc::bind(fd, (&storage as *const libc::sockaddr_storage).cast(), len) } != 0 {
            let e = std::io::Error::last_os_error();
            unsafe { libc::close(fd) };
            return Err(e);
        }
        // Non-blocking connect, then wait for writability with poll.
        unsafe {
            libc::fcntl(
                fd,
                libc::F_SETFL,
                libc::fcntl(fd, libc::F_GETFL) | libc::O_NONBLOCK,
            )
        };
        let (storage, len) = sockaddr(&dst);
        let rc =
            unsafe { libc::connect(fd, (&storage as *const libc::sockaddr_storage).cast(), len) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINPROGRESS) {
                unsafe { libc::close(fd) };
                return Err(e);
            }
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLOUT,
                revents: 0,
            };
            let n = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) };
            let mut err: i32 = 0;
            let mut elen = std::mem::size_of::<i32>() as libc::socklen_t;
            unsafe {
                libc::getsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_ERROR,
                    (&mut err as *mut i32).cast(),
                    &mut elen,
                )
            };
            if n <= 0 || err != 0 {
                unsafe { libc::close(fd) };
                return Err(if n <= 0 {
                    std::io::ErrorKind::TimedOut.into()
                } else {
                    std::io::Error::from_raw_os_error(err)
                });
            }
        }
        unsafe {
            libc::fcntl(
                fd,
                libc::F_SETFL,
                libc::fcntl(fd, libc::F_GETFL) & !libc::O_NONBLOCK,
            )
        };
        // SAFETY: fd is a connected stream socket we own.
        Ok(unsafe { TcpStream::from_raw_fd(fd) })
    }

    fn sockaddr(a: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
        // SAFETY: zeroed storage is a valid sockaddr_storage; we fill the family's fields.
        let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        match a {
            SocketAddr::V4(v4) => {
                let sin = libc::sockaddr_in {
                    sin_family: libc::AF_INET as u16,
                    sin_port: v4.port().to_be(),
                    sin_addr: libc::in_addr {
                        s_addr: u32::from_ne_bytes(v4.ip().octets()),
                    },
                    sin_zero: [0; 8],
                };
                unsafe {
                    std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin)
                };
                (
                    storage,
                    std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                )
            }
            SocketAddr::V6(v6) => {
                let sin6 = libc::sockaddr_in6 {
                    sin6_family: libc::AF_INET6 as u16,
                    sin6_port: v6.port().to_be(),
                    sin6_flowinfo: 0,
                    sin6_addr: libc::in6_addr {
                        s6_addr: v6.ip().octets(),
                    },
                    sin6_scope_id: 0,
                };
                unsafe {
                    std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin6)
                };
                (
                    storage,
                    std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
                )
            }
        }
    }

    /// Whether a TCP connection is admitted: connect and get an echo back.
    pub fn reaches(ns: &Netns, addr: &str) -> bool {
        reaches_from(ns, addr, None)
    }

    pub fn reaches_from(ns: &Netns, addr: &str, source: Option<&str>) -> bool {
        match connect(ns, addr, source, Duration::from_millis(500)) {
            Ok(mut s) => echo_ok(&mut s),
            Err(_) => false,
        }
    }

    /// One round trip on an open connection.
    pub fn echo_ok(s: &mut TcpStream) -> bool {
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let mut buf = [0u8; 4];
        s.write_all(b"ping").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"ping"
    }
}

/// Connection attempts to `addr` from a namespace, over and over on a thread of its own,
/// until stopped: for "denied traffic stays denied" during a change.
pub struct Prober {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    probes: std::sync::Arc<std::sync::atomic::AtomicU64>,
    delivered: std::sync::Arc<std::sync::atomic::AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Prober {
    pub fn start(ns: &Netns, addr: &str) -> Prober {
        use std::sync::{
            atomic::{AtomicBool, AtomicU64, Ordering},
            Arc,
        };
        let stop = Arc::new(AtomicBool::new(false));
        let probes = Arc::new(AtomicU64::new(0));
        let delivered = Arc::new(AtomicU64::new(0));
        let addr: std::net::SocketAddr = addr.parse().expect("probe address");
        let file = File::open(format!("/run/netns/{}", ns.name())).expect("netns");
        let (s, p, d) = (stop.clone(), probes.clone(), delivered.clone());
        let thread = std::thread::spawn(move || {
            // SAFETY: setns on this thread only.
            let rc =
                unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "prober: setns: {}", std::io::Error::last_os_error());
            while !s.load(Ordering::Relaxed) {
                p.fetch_add(1, Ordering::Relaxed);
                if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
                    d.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        Prober {
            stop,
            probes,
            delivered,
            thread: Some(thread),
        }
    }

    /// Probes sent so far.
    pub fn probes(&self) -> u64 {
        self.probes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Stops and returns (probes sent, probes delivered).
    pub fn finish(mut self) -> (u64, u64) {
        use std::sync::atomic::Ordering;
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().expect("prober thread");
        }
        (
            self.probes.load(Ordering::Relaxed),
            self.delivered.load(Ordering::Relaxed),
        )
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The text of `examples/<name>`.
pub fn example(name: &str) -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../examples")
            .join(name),
    )
    .unwrap_or_else(|e| panic!("examples/{name}: {e}"))
}
