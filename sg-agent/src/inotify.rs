//! A minimal inotify watcher over directories.
#![allow(unsafe_code)]

use std::{ffi::CString, io, os::unix::ffi::OsStrExt, path::PathBuf};

/// Calls `on_change` once the watches are in place (so a change made before then is not
/// missed), then after every batch of events in `dirs`, until it returns false.
pub fn watch(dirs: &[PathBuf], mut on_change: impl FnMut() -> bool) -> io::Result<()> {
    // SAFETY: plain syscalls on a descriptor we own; the buffer is ours and sized.
    unsafe {
        let fd = libc::inotify_init1(libc::IN_CLOEXEC);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let mask = libc::IN_CLOSE_WRITE
            | libc::IN_MOVED_TO
            | libc::IN_CREATE
            | libc::IN_DELETE
            | libc::IN_ATTRIB
            | libc::IN_MOVE_SELF
            | libc::IN_DELETE_SELF;
        for d in dirs {
            let c = CString::new(d.as_os_str().as_bytes()).map_err(io::Error::other)?;
            if libc::inotify_add_watch(fd, c.as_ptr(), mask) < 0 {
                let e = io::Error::last_os_error();
                libc::close(fd);
                return Err(e);
            }
        }
        let mut buf = [0u8; 4096];
        if !on_change() {
            libc::close(fd);
            return Ok(());
        }
        loop {
            let n = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                libc::close(fd);
                return Err(e);
            }
            if !on_change() {
                libc::close(fd);
                return Ok(());
            }
        }
    }
}
