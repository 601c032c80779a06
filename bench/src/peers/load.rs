//! Load generation: iperf3 streams, a connection-rate client, and the live-frames
//! generator (BPF_PROG_RUN) for denied floods and UDP sinks.

use super::*;
use crate::object::BenchObject;

/// An iperf3 client of the server, JSON output.
pub(crate) fn iperf_client(pair: &Pair, streams: u32, secs: u32) -> Command {
    let mut c = pair.client.cmd("iperf3");
    c.args([
        "-c",
        SERVER,
        "-p",
        "5201",
        "-J",
        "-t",
        &secs.to_string(),
        "-P",
        &streams.to_string(),
    ]);
    c
}

/// Received throughput from iperf3's JSON report, Gbit/s.
pub(crate) fn iperf_gbps(json: &[u8]) -> f64 {
    let v: Value = serde_json::from_slice(json).unwrap_or(Value::Null);
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or(0.0)
        / 1e9
}

pub(crate) fn iperf(pair: &Pair, streams: u32, secs: u32) -> f64 {
    iperf_gbps(
        &iperf_client(pair, streams, secs)
            .output()
            .expect("iperf3 -c")
            .stdout,
    )
}

/// New connections per second: connect, close, repeat, for `secs` (bounded in time).
pub(crate) fn conn_rate(pair: &Pair, secs: f64) -> f64 {
    let addr: SocketAddr = format!("{SERVER}:5300").parse().unwrap();
    pair.client.enter(|| {
        let start = Instant::now();
        let mut n = 0u64;
        while start.elapsed().as_secs_f64() < secs {
            if let Ok(mut s) =
                std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200))
            {
                let mut b = [0u8; 1];
                let _ = s.set_read_timeout(Some(Duration::from_millis(50)));
                let _ = s.read(&mut b);
                n += 1;
            }
        }
        n as f64 / start.elapsed().as_secs_f64()
    })
}

/// The traffic generator: sg_gen run with BPF_PROG_RUN in live-frames mode, as if the
/// frames arrived on the client's eth0, which transmits them (XDP_TX) to the server.
pub(crate) struct Generator {
    pub(crate) object: BenchObject,
}

impl Generator {
    pub(crate) fn new() -> Generator {
        Generator {
            object: BenchObject::load(),
        }
    }

    /// Sends `template` (re-randomised per frame) for `secs`; returns frames sent.
    pub(crate) fn send(&mut self, pair: &Pair, template: &[u8], secs: f64) -> u64 {
        let ifindex = pair.client.ifindex("eth0");
        let prog = self.object.xdp(sg_common::PROG_GEN);
        pair.client.enter(|| {
            avoid_receive_cpu();
            let mut ctx = [0u8; 24];
            ctx[4..8].copy_from_slice(&(template.len() as u32).to_ne_bytes());
            ctx[12..16].copy_from_slice(&ifindex.to_ne_bytes());
            let start = Instant::now();
            let mut sent = 0u64;
            while start.elapsed().as_secs_f64() < secs {
                let opts = TestRunOptions {
                    data_in: Some(template),
                    ctx_in: Some(&ctx),
                    repeat: 20_000,
                    attrs: TestRunAttrs::new().xdp_live_frames(64),
                    ..TestRunOptions::default()
                };
                match prog.test_run(opts) {
                    Ok(_) => sent += 20_000,
                    Err(e) => panic!("live-frames generator: {e:?}"),
                }
            }
            sent
        })
    }
}

pub(crate) fn syn_flood_template() -> Vec<u8> {
    let mut f = tcp("198.19.0.1", SERVER, 1024, 7777, TH_SYN).build();
    f[0..6].copy_from_slice(&mac_bytes(SERVER_MAC));
    packet::fix_ipv4_checksums(&mut f);
    f
}

pub(crate) fn udp_template() -> Vec<u8> {
    let mut s = udp(CLIENT, SERVER, 1024, 9000);
    s.payload = 22; // a 64-byte frame
    let mut f = s.build();
    f[0..6].copy_from_slice(&mac_bytes(SERVER_MAC));
    packet::fix_ipv4_checksums(&mut f);
    f
}

pub(crate) fn mac_bytes(mac: &str) -> [u8; 6] {
    let mut b = [0u8; 6];
    for (i, part) in mac.split(':').enumerate() {
        b[i] = u8::from_str_radix(part, 16).unwrap();
    }
    b
}

/// Packets per second received by a UDP sink on the server during `secs`.
pub(crate) fn udp_sink(pair: &Pair, gen: &mut Generator, secs: f64) -> f64 {
    let sock = pair
        .server
        .udp_bind(format!("{SERVER}:9000").parse().unwrap());
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let received = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (s2, r2) = (stop.clone(), received.clone());
    let counter = std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while !s2.load(Ordering::Relaxed) {
            if sock.recv(&mut buf).is_ok() {
                r2.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    let started = Instant::now();
    gen.send(pair, &udp_template(), secs);
    // Frames still in flight when the generator stops: count until the sink is quiet.
    let mut last = received.load(Ordering::Relaxed);
    let _ = wait_for_quiet(Duration::from_secs(2), || {
        let now = received.load(Ordering::Relaxed);
        std::mem::replace(&mut last, now) == now
    });
    stop.store(true, Ordering::Relaxed);
    counter.join().unwrap();
    received.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64()
}

/// What a denied flood showed.
pub(crate) struct Flood {
    /// Frames per second the generator got through (into the server's veth ring).
    pub(crate) sent_pps: f64,
    /// Packets per second the filter dropped, by its own counter.
    pub(crate) dropped_pps: Option<f64>,
    /// Packets the filter drops per second of the server's receive CPU time: its drop
    /// capacity per core, whatever the generator and the veth ring could deliver.
    pub(crate) capacity_pps: Option<f64>,
    /// For sg: ns per packet spent in its ingress program during the flood.
    pub(crate) program_ns: Option<f64>,
    /// The allowed TCP stream's throughput during the flood, Gbit/s.
    pub(crate) stream_gbps: f64,
}

/// A denied SYN flood from random sources, alone, with the server's receive processing
/// on a core of its own: frames the generator got through, packets the filter dropped and
/// the receive CPU time it took; then (receive processing inline again, as in every other
/// figure) the throughput of an allowed TCP stream during the same flood. (On veth an XDP program turns every
/// large skb of the stream into a copied frame, so the stream and the flood are measured
/// apart: together, the copies would set the drop rate.)
pub(crate) fn flood(pair: &Pair, installed: &Installed, gen: &mut Generator, secs: f64) -> Flood {
    let program = match installed.variant {
        Variant::SgXdp | Variant::SgXdpLogs => Some(sg_common::PROG_XDP_INGRESS),
        Variant::SgTc => Some(sg_common::PROG_TC_INGRESS),
        Variant::BareDrop => Some(sg_common::PROG_BENCH_DROP),
        _ => None,
    };
    let napi = pair.threaded_receive(true);
    let stats_before = program.map(prog_stats);
    let before = installed.dropped();
    let cpu_before = cpu_ns(&napi);
    let t = Instant::now();
    let sent = gen.send(pair, &syn_flood_template(), secs);
    let elapsed = t.elapsed().as_secs_f64();
    let cpu = cpu_ns(&napi).saturating_sub(cpu_before) as f64 / 1e9;
    let program_ns = program.zip(stats_before).and_then(|(name, (t0, n0))| {
        let (t1, n1) = prog_stats(name);
        (n1 > n0).then(|| (t1 - t0) as f64 / (n1 - n0) as f64)
    });
    let after = installed.dropped();
    pair.threaded_receive(false);
    let dropped = match (before, after) {
        (Some(b), Some(a)) => Some(a.saturating_sub(b) as f64),
        _ => None,
    };
    if installed.variant == Variant::BareDrop {
        // Everything is dropped: there is no allowed stream to measure.
        return Flood {
            sent_pps: sent as f64 / elapsed,
            dropped_pps: dropped.map(|d| d / elapsed),
            capacity_pps: dropped.filter(|_| cpu > 0.0).map(|d| d / cpu),
            program_ns,
            stream_gbps: f64::NAN,
        };
    }
    let stream = iperf_client(pair, 1, secs.ceil() as u32 + 1)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("iperf3 -c");
    // The flood starts once the allowed stream is established.
    wait_for("the iperf3 stream", Duration::from_secs(5), || {
        let ss = pair
            .client
            .cmd("ss")
            .args(["-Htn", "state", "established", "( dport = :5201 )"])
            .output()
            .ok()?;
        (String::from_utf8_lossy(&ss.stdout).lines().count() >= 2).then_some(())
    });
    gen.send(pair, &syn_flood_template(), secs);
    let out = stream.wait_with_output().expect("iperf3 -c");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    let stream_gbps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or(0.0)
        / 1e9;
    Flood {
        sent_pps: sent as f64 / elapsed,
        dropped_pps: dropped.map(|d| d / elapsed),
        capacity_pps: dropped.filter(|_| cpu > 0.0).map(|d| d / cpu),
        program_ns,
        stream_gbps,
    }
}

/// Polls `quiet` every 20 ms (a sink's arrival window) until it says nothing changed
/// since the last poll, or `deadline` passes; true when it went quiet.
fn wait_for_quiet(deadline: Duration, mut quiet: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        if quiet() {
            return true;
        }
    }
    false
}
