//! Network namespaces as hosts. Names are unique per process and test, so tests run in
//! parallel; every namespace is deleted on drop, even when the test panics.

use std::{
    fs::File,
    io,
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Runs a command, panicking with its output when it fails.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{cmd:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

/// A network namespace that is deleted on drop.
pub struct Netns {
    name: String,
}

impl Netns {
    /// A new namespace named `sg-<pid>-<n>-<tag>`, loopback up.
    pub fn new(tag: &str) -> Netns {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("sg-{}-{n}-{tag}", std::process::id());
        run(Command::new("ip").args(["netns", "add", &name]));
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n <ns> args…`, panicking on failure.
    pub fn ip(&self, args: &[&str]) -> Output {
        run(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// A command that runs inside the namespace.
    pub fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Runs `f` on a thread inside the namespace. Sockets made there stay in it.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let file = File::open(format!("/run/netns/{}", self.name))
            .unwrap_or_else(|e| panic!("opening netns {}: {e}", self.name));
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: setns on this (scoped, short-lived) thread only.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(
                    rc,
                    0,
                    "setns into {}: {}",
                    self.name,
                    io::Error::last_os_error()
                );
                f()
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }

    pub fn ifindex(&self, ifname: &str) -> u32 {
        let out = self.ip(&["-o", "link", "show", "dev", ifname]);
        let text = String::from_utf8_lossy(&out.stdout);
        text.split(':')
            .next()
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("ifindex of {ifname}: {text}"))
    }

    pub fn mac(&self, ifname: &str) -> String {
        let out = self.ip(&["-o", "link", "show", "dev", ifname]);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let after = text
            .split("link/ether ")
            .nth(1)
            .unwrap_or_else(|| panic!("no MAC for {ifname}: {text}"));
        after
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string()
    }

    pub fn tcp_listen(&self, addr: SocketAddr) -> TcpListener {
        self.enter(|| TcpListener::bind(addr))
            .unwrap_or_else(|e| panic!("{}: listen on {addr}: {e}", self.name))
    }

    pub fn tcp_connect(&self, addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
        self.enter(|| TcpStream::connect_timeout(&addr, timeout))
    }

    pub fn udp_bind(&self, addr: SocketAddr) -> UdpSocket {
        self.enter(|| UdpSocket::bind(addr))
            .unwrap_or_else(|e| panic!("{}: bind {addr}: {e}", self.name))
    }

    /// One ICMP echo (v4 or v6) of `size` payload bytes, from the harness's own raw socket
    /// inside the namespace: true when the matching reply came back within `wait_s`
    /// seconds. A probe that cannot run (no socket, a send error) panics with the reason:
    /// it is never taken for a drop.
    pub fn ping(&self, addr: &str, size: usize, wait_s: u32) -> bool {
        let dst: std::net::IpAddr = addr
            .parse()
            .unwrap_or_else(|e| panic!("ping {addr}: not an address: {e}"));
        self.enter(|| icmp_echo(dst, size, Duration::from_secs(wait_s.into())))
            .unwrap_or_else(|e| panic!("{}: ping {addr}: the probe could not run: {e}", self.name))
    }
}

static NEXT_ECHO_ID: AtomicU32 = AtomicU32::new(1);

/// The Internet checksum (RFC 1071) of `data`.
fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32)
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Sends one echo request on a raw socket of the calling thread's namespace and waits for
/// its reply (same identifier and sequence). Ok(false): no reply in time.
fn icmp_echo(dst: std::net::IpAddr, size: usize, wait: Duration) -> io::Result<bool> {
    use std::os::fd::{FromRawFd, OwnedFd};
    let v6 = dst.is_ipv6();
    let (family, proto, request, reply) = if v6 {
        (libc::AF_INET6, libc::IPPROTO_ICMPV6, 128u8, 129u8)
    } else {
        (libc::AF_INET, libc::IPPROTO_ICMP, 8u8, 0u8)
    };
    // SAFETY: plain socket(2); the descriptor is owned below.
    let fd = unsafe { libc::socket(family, libc::SOCK_RAW | libc::SOCK_CLOEXEC, proto) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let id = (NEXT_ECHO_ID.fetch_add(1, Ordering::Relaxed) as u16) ^ (std::process::id() as u16);
    let seq: u16 = 1;
    let mut msg = vec![request, 0, 0, 0];
    msg.extend_from_slice(&id.to_be_bytes());
    msg.extend_from_slice(&seq.to_be_bytes());
    msg.extend((0..size).map(|i| i as u8));
    if !v6 {
        // The kernel fills in the ICMPv6 checksum itself (RFC 3542); ICMPv4 is ours.
        let c = checksum(&msg);
        msg[2..4].copy_from_slice(&c.to_be_bytes());
    }
    let sent = match dst {
        std::net::IpAddr::V4(a) => {
            let sa = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: 0,
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: valid buffer and address of the stated sizes.
            unsafe {
                libc::sendto(
                    fd.as_raw_fd(),
                    msg.as_ptr().cast(),
                    msg.len(),
                    0,
                    (&sa as *const libc::sockaddr_in).cast(),
                    std::mem::size_of::<libc::sockaddr_in>() as u32,
                )
            }
        }
        std::net::IpAddr::V6(a) => {
            let sa = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: 0,
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: a.octets(),
                },
                sin6_scope_id: 0,
            };
            // SAFETY: valid buffer and address of the stated sizes.
            unsafe {
                libc::sendto(
                    fd.as_raw_fd(),
                    msg.as_ptr().cast(),
                    msg.len(),
                    0,
                    (&sa as *const libc::sockaddr_in6).cast(),
                    std::mem::size_of::<libc::sockaddr_in6>() as u32,
                )
            }
        }
    };
    if sent < 0 {
        let e = io::Error::last_os_error();
        // No route or neighbour is a network answer (as ping reports), not a broken probe.
        if matches!(
            e.raw_os_error(),
            Some(libc::EHOSTUNREACH | libc::ENETUNREACH)
        ) {
            return Ok(false);
        }
        return Err(e);
    }
    let deadline = std::time::Instant::now() + wait;
    let mut buf = vec![0u8; 65536];
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Ok(false);
        }
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd we own.
        let n = unsafe { libc::poll(&mut pfd, 1, left.as_millis().max(1) as i32) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Ok(false);
        }
        // SAFETY: receive into our buffer of the stated size.
        let got = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if got < 0 {
            return Err(io::Error::last_os_error());
        }
        let pkt = &buf[..got as usize];
        // Raw ICMPv4 sockets deliver the IP header; ICMPv6 ones do not.
        let icmp = if v6 {
            pkt
        } else {
            let ihl = pkt.first().map_or(0, |b| (b & 0x0f) as usize * 4);
            pkt.get(ihl..).unwrap_or(&[])
        };
        if icmp.len() >= 8
            && icmp[0] == reply
            && icmp[4..6] == id.to_be_bytes()
            && icmp[6..8] == seq.to_be_bytes()
        {
            return Ok(true);
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Kill anything still running inside, then delete the namespace.
        let _ = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
            .map(|o| {
                for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                    if let Ok(pid) = pid.parse::<i32>() {
                        // SAFETY: plain kill(2) of a process in our own test namespace.
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                    }
                }
            });
        let deleted = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
        // As aya's NetNsGuard: a namespace that outlives its test is a failed test (unless
        // the test is failing already, when a second panic would only abort).
        let gone = !std::path::Path::new("/run/netns").join(&self.name).exists();
        if !gone && !std::thread::panicking() {
            panic!(
                "network namespace {} leaked: ip netns del said {:?}",
                self.name,
                deleted.map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
            );
        }
    }
}

/// A veth pair between two namespaces, created directly inside them (no name clashes in
/// the host namespace), with addresses (CIDR notation) and links up.
pub fn veth(a: &Netns, a_if: &str, a_addrs: &[&str], b: &Netns, b_if: &str, b_addrs: &[&str]) {
    run(Command::new("ip").args([
        "link",
        "add",
        a_if,
        "netns",
        a.name(),
        "type",
        "veth",
        "peer",
        "name",
        b_if,
        "netns",
        b.name(),
    ]));
    for (ns, ifname, addrs) in [(a, a_if, a_addrs), (b, b_if, b_addrs)] {
        for addr in addrs {
            let mut args = vec!["addr", "add", addr, "dev", ifname];
            if addr.contains(':') {
                args.push("nodad");
            }
            ns.ip(&args);
        }
        ns.ip(&["link", "set", ifname, "up"]);
    }
}
