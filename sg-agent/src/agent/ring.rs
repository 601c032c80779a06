//! The event ring's one reader: a thread drains `SG_EVENTS_V2` every 50 ms (and the
//! agent drains it before each flow log flush), feeds the flow log, and streams every
//! event as a JSON line to the `sg-agent monitor` clients on the run directory's socket.

#![forbid(unsafe_code)]

use std::{
    io::Write,
    os::unix::net::{UnixListener, UnixStream},
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use crate::{
    events::{decode, event_json, monitor_socket, Labels},
    flowlog::FlowLog,
};

/// The ring's one reader: every event goes to the flow log (when there is one) and to
/// every connected monitor.
pub struct Reader {
    ring: aya::maps::RingBuf<aya::maps::MapData>,
    labels: Arc<Mutex<Labels>>,
    flow_log: Option<Arc<Mutex<FlowLog>>>,
    clients: Arc<Mutex<Vec<UnixStream>>>,
}

impl Reader {
    /// Opens the pinned ring and the monitor socket.
    pub fn open(
        pin_dir: &Path,
        run_dir: &Path,
        labels: Arc<Mutex<Labels>>,
        flow_log: Option<Arc<Mutex<FlowLog>>>,
    ) -> std::io::Result<Reader> {
        use aya::maps::{Map, MapData, RingBuf};
        let name = sg_common::registry::EVENTS.name;
        let data = MapData::from_pin(pin_dir.join(name)).map_err(std::io::Error::other)?;
        let map = Map::from_map_data(data).map_err(std::io::Error::other)?;
        let ring = RingBuf::try_from(map).map_err(std::io::Error::other)?;
        let socket = monitor_socket(run_dir);
        let _ = std::fs::remove_file(&socket);
        let listener = UnixListener::bind(&socket)?;
        std::fs::set_permissions(&socket, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        let clients: Arc<Mutex<Vec<UnixStream>>> = Arc::new(Mutex::new(Vec::new()));
        let accepting = clients.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let _ = conn.set_write_timeout(Some(Duration::from_millis(50)));
                accepting
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(conn);
            }
        });
        Ok(Reader {
            ring,
            labels,
            flow_log,
            clients,
        })
    }

    /// Takes every event in the ring now; returns how many.
    pub fn drain(&mut self) -> usize {
        let mut batch = Vec::new();
        while let Some(item) = self.ring.next() {
            if let Some(e) = decode(&item) {
                batch.push(e);
            }
        }
        if batch.is_empty() {
            return 0;
        }
        if let Some(f) = &self.flow_log {
            let mut f = f.lock().unwrap_or_else(|p| p.into_inner());
            for e in &batch {
                f.on_event(e);
            }
        }
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if !clients.is_empty() {
            let labels = self
                .labels
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            let mut text = String::new();
            for e in &batch {
                text += &event_json(e, &labels).to_string();
                text.push('\n');
            }
            // A monitor that went away, or cannot keep up, is dropped.
            clients.retain_mut(|c| c.write_all(text.as_bytes()).is_ok());
        }
        batch.len()
    }
}

/// Drains the ring every 50 ms on a thread of its own.
pub fn spawn_reader(reader: Arc<Mutex<Reader>>) {
    std::thread::spawn(move || loop {
        let n = reader.lock().unwrap_or_else(|p| p.into_inner()).drain();
        if n == 0 {
            std::thread::sleep(Duration::from_millis(50));
        }
    });
}
