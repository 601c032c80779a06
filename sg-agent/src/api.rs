//! The optional HTTP API (`--api ADDR`): `GET /status` (the status document) and
//! `GET /metrics` (Prometheus text). No port is opened unless asked.

#![forbid(unsafe_code)]

use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener},
    path::PathBuf,
    sync::{Arc, Mutex},
};

use crate::status;

pub fn serve(
    addr: SocketAddr,
    document: Arc<Mutex<String>>,
    labels: Arc<Mutex<crate::events::Labels>>,
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
                    document.lock().map(|s| s.clone()).unwrap_or_default(),
                ),
                "/metrics" => (
                    "200 OK",
                    "text/plain; version=0.0.4",
                    status::metrics(
                        &pin_dir,
                        &document.lock().map(|s| s.clone()).unwrap_or_default(),
                        &labels.lock().map(|l| l.clone()).unwrap_or_default(),
                    ),
                ),
                _ => ("404 Not Found", "text/plain", "not found\n".to_string()),
            };
            let mut conn = &conn;
            let _ = write!(conn, "HTTP/1.1 {code}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
        }
    });
    Ok(())
}
