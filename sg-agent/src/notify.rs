//! The systemd notification protocol (sd_notify): `READY=1` once the first policy is
//! enforced, `STATUS=` lines, `RELOADING=1` around a SIGHUP re-read, `STOPPING=1`, and
//! the watchdog keep-alive when the unit asks for one. Without `NOTIFY_SOCKET` (not run
//! by systemd) every call does nothing.

#![forbid(unsafe_code)]

use std::{
    os::unix::net::UnixDatagram,
    path::PathBuf,
    time::{Duration, Instant},
};

pub struct Notifier {
    socket: Option<(UnixDatagram, PathBuf)>,
    /// Half the unit's `WatchdogSec=`, and when the keep-alive is next due.
    watchdog: Option<(Duration, Instant)>,
}

impl Notifier {
    /// From the environment systemd sets; the variables are removed so that children
    /// do not inherit them.
    pub fn from_env() -> Notifier {
        let path = std::env::var_os("NOTIFY_SOCKET").map(PathBuf::from);
        let socket = path.and_then(|p| {
            // An abstract socket ("@name") needs the Linux-only address API: not used by
            // systemd for services, so only filesystem sockets are supported.
            if p.as_os_str().to_string_lossy().starts_with('@') {
                log::warn!(
                    "NOTIFY_SOCKET {}: abstract sockets are not supported",
                    p.display()
                );
                return None;
            }
            match UnixDatagram::unbound() {
                Ok(s) => Some((s, p)),
                Err(e) => {
                    log::warn!("NOTIFY_SOCKET: {e}");
                    None
                }
            }
        });
        let watchdog = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|_| {
                std::env::var("WATCHDOG_PID")
                    .ok()
                    .and_then(|p| p.parse::<u32>().ok())
                    .is_none_or(|p| p == std::process::id())
            })
            .map(|us| {
                let half = Duration::from_micros(us / 2);
                (half, Instant::now())
            });
        Notifier { socket, watchdog }
    }

    fn send(&self, message: &str) {
        if let Some((s, path)) = &self.socket {
            if let Err(e) = s.send_to(message.as_bytes(), path) {
                log::debug!("sd_notify {message:?}: {e}");
            }
        }
    }

    /// The first policy is enforced: `systemctl start` returns now.
    pub fn ready(&self, status: &str) {
        self.send(&format!(
            "READY=1\nSTATUS={status}\nMAINPID={}",
            std::process::id()
        ));
    }

    pub fn status(&self, status: &str) {
        self.send(&format!("STATUS={status}"));
    }

    pub fn reloading(&self) {
        self.send("RELOADING=1\nSTATUS=re-reading the state");
    }

    /// A reload finished (after `reloading`).
    pub fn reloaded(&self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={status}"));
    }

    pub fn stopping(&self) {
        self.send("STOPPING=1\nSTATUS=stopping; programs stay attached and maps pinned");
    }

    /// Sends the watchdog keep-alive when it is due; returns when the next one is.
    pub fn watchdog(&mut self, now: Instant) -> Option<Instant> {
        let (half, due) = self.watchdog.as_mut()?;
        if now >= *due {
            *due = now + *half;
            if let Some((s, path)) = &self.socket {
                let _ = s.send_to(b"WATCHDOG=1", path);
            }
        }
        Some(*due)
    }
}
