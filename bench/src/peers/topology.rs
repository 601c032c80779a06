//! The topology: server and client namespaces joined by a veth pair.

use super::*;

pub(crate) const SERVER: &str = "198.18.0.1";
pub(crate) const CLIENT: &str = "198.18.0.2";
pub(crate) const SERVER_MAC: &str = "02:5e:00:00:fe:01";

/// Server and client namespaces joined by a veth pair.
pub(crate) struct Pair {
    pub(crate) server: Netns,
    pub(crate) client: Netns,
    pub(crate) iperf: Child,
    pub(crate) stop: Arc<AtomicBool>,
}

impl Pair {
    pub(crate) fn new(mtu: u32) -> Pair {
        let server = Netns::new("psrv");
        let client = Netns::new("pcli");
        veth(
            &server,
            "eth0",
            &[&format!("{SERVER}/24")],
            &client,
            "eth0",
            &[&format!("{CLIENT}/24")],
        );
        server.ip(&["link", "set", "eth0", "address", SERVER_MAC]);
        for ns in [&server, &client] {
            ns.ip(&["link", "set", "eth0", "mtu", &mtu.to_string()]);
            // NAPI on both ends: the generator's frames (XDP_TX) need it on the receiver.
            let _ = ns.cmd("ethtool").args(["-K", "eth0", "gro", "on"]).output();
        }
        let iperf = server
            .cmd("iperf3")
            .args(["-s", "-p", "5201"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("iperf3 -s");
        // The connection-rate sink: accept and close.
        let listener: TcpListener = server.tcp_listen(format!("{SERVER}:5300").parse().unwrap());
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        std::thread::spawn(move || {
            for c in listener.incoming() {
                if s2.load(Ordering::Relaxed) {
                    return;
                }
                drop(c);
            }
        });
        wait_for("iperf3 server", Duration::from_secs(5), || {
            client
                .tcp_connect(
                    format!("{SERVER}:5201").parse().unwrap(),
                    Duration::from_millis(200),
                )
                .ok()
                .map(|_| ())
        });
        Pair {
            server,
            client,
            iperf,
            stop,
        }
    }
}

impl Pair {
    /// Moves the server's receive processing into its own kernel thread on the last CPU
    /// with real-time priority (threaded NAPI), as a NIC's softirq on a core of its own,
    /// and returns the thread's pids; or (`on` false) back inline.
    pub(crate) fn threaded_receive(&self, on: bool) -> Vec<u32> {
        let before = napi_threads();
        let _ = self
            .server
            .cmd("sh")
            .args([
                "-c",
                &format!("echo {} > /sys/class/net/eth0/threaded", on as u8),
            ])
            .output();
        if !on {
            return vec![];
        }
        let threads: Vec<u32> = napi_threads()
            .into_iter()
            .filter(|p| !before.contains(p))
            .collect();
        pin_to_receive_cpu(&threads);
        threads
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.iperf.kill();
        let _ = self.iperf.wait();
    }
}
