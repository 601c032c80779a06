//! What wakes the agent: signals, inotify on the state file's directories, and the file's
//! identity, which tells a real change from a spurious wake-up.

#![forbid(unsafe_code)]

use std::{path::Path, sync::mpsc};

pub(super) use signal_hook::iterator::Signals;

use super::{io, AgentError, Event};
use crate::sys;

/// Identity of a file's content: (device, inode, length, mtime seconds, nanoseconds).
pub(super) type FileIdentity = (u64, u64, u64, i64, i64);

pub(super) fn identity(path: &Path) -> Option<FileIdentity> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.dev(), m.ino(), m.len(), m.mtime(), m.mtime_nsec()))
}

/// Catches SIGINT, SIGTERM and SIGHUP from now on: one that arrives before the loop runs
/// waits for it, instead of ending the agent by the default action half-way through.
pub(super) fn catch_signals() -> Result<Signals, AgentError> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    Signals::new([SIGINT, SIGTERM, SIGHUP]).map_err(io("installing signal handlers"))
}

/// Turns the signals caught since [`catch_signals`] into the loop's events.
pub(super) fn spawn_signals(mut signals: Signals, tx: mpsc::Sender<Event>) {
    use signal_hook::consts::SIGHUP;
    std::thread::spawn(move || {
        for sig in signals.forever() {
            let ev = if sig == SIGHUP {
                Event::Reload
            } else {
                Event::Stop
            };
            if tx.send(ev).is_err() {
                return;
            }
        }
    });
}

/// Watches the state file's directory with inotify: in-place writes (on close), renames
/// over it and symlink swaps all show up there.
pub(super) fn spawn_watcher(state: &Path, tx: mpsc::Sender<Event>) {
    let dir = state
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let mut dirs = vec![dir];
    if let Ok(target) = std::fs::canonicalize(state) {
        if let Some(p) = target.parent() {
            if !dirs.iter().any(|d| d == p) {
                dirs.push(p.to_path_buf());
            }
        }
    }
    // The state file's name, and for a symlink every name on the way to the target.
    let mut names: Vec<std::ffi::OsString> = state
        .file_name()
        .map(|n| n.to_os_string())
        .into_iter()
        .collect();
    let mut link = state.to_path_buf();
    for _ in 0..8 {
        let Ok(target) = std::fs::read_link(&link) else {
            break;
        };
        let target = if target.is_absolute() {
            target
        } else {
            link.parent().unwrap_or(Path::new(".")).join(target)
        };
        names.extend(target.components().map(|c| c.as_os_str().to_os_string()));
        link = target;
    }
    std::thread::spawn(move || {
        if let Err(e) = sys::inotify_watch(&dirs, &names, || tx.send(Event::StateChanged).is_ok()) {
            log::warn!("inotify unavailable ({e}); polling the state file every tick");
        }
    });
}

/// Whether a writer still has the state file open: its content is not acted on until it
/// is closed (SPEC §3: a file being written is never acted on half-written).
pub(super) fn still_being_written(path: &Path) -> bool {
    match sys::being_written(path) {
        Ok(w) => w,
        Err(e) => {
            log::debug!(
                "{}: cannot tell whether it is being written: {e}",
                path.display()
            );
            false
        }
    }
}

/// At start: waits (up to 30 s) for a writer of the state file to close it.
pub(super) fn wait_until_written(path: &Path) -> Result<(), AgentError> {
    let started = std::time::Instant::now();
    let mut said = false;
    while still_being_written(path) {
        if !said {
            log::info!(
                "{}: being written; waiting for the writer to close it",
                path.display()
            );
            said = true;
        }
        if started.elapsed() > std::time::Duration::from_secs(30) {
            return Err(AgentError::Io {
                what: format!("{}: still open for writing after 30 s", path.display()),
                source: std::io::Error::from(std::io::ErrorKind::TimedOut),
            });
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    Ok(())
}
