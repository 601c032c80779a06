//! The optional HTTP API (`--api ADDR`): `GET /status` (the status document) and
//! `GET /metrics` (Prometheus text). No port is opened unless asked.

use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener},
    path::PathBuf,
    sync::{Arc, Mutex},
};

use crate::datapath;

pub fn serve(
    addr: SocketAddr,
    status: Arc<Mutex<String>>,
    pin_dir: PathBuf,
) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr)?;
    log::info!("API listening on http://{addr}");
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let mut reader = BufReader::new(&conn);
            let mut line = String::new();
            if reader.read_line(&mut line).is_err() {
                continue;
            }
            let path = line.split_whitespace().nth(1).unwrap_or("/");
            let (code, ctype, body) = match path {
                "/status" => (
                    "200 OK",
                    "application/json",
                    status.lock().map(|s| s.clone()).unwrap_or_default(),
                ),
                "/metrics" => ("200 OK", "text/plain; version=0.0.4", metrics(&pin_dir)),
                _ => ("404 Not Found", "text/plain", "not found\n".to_string()),
            };
            let mut conn = &conn;
            let _ = write!(conn, "HTTP/1.1 {code}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
        }
    });
    Ok(())
}

/// Counters of every enforced interface in Prometheus text format.
pub fn metrics(pin_dir: &std::path::Path) -> String {
    let mut out = String::from("# TYPE sg_packets_total counter\n");
    if let Ok((_, ifaces)) = datapath::pinned_status(pin_dir) {
        for (ifindex, (_, counters)) in ifaces {
            for (direction, name, value) in crate::cli::counter_rows(&counters) {
                out += &format!("sg_packets_total{{ifindex=\"{ifindex}\",direction=\"{direction}\",counter=\"{name}\"}} {value}\n");
            }
        }
    }
    out
}
