//! A minimal inotify watcher over directories.
#![allow(unsafe_code)]

use std::{ffi::CString, io, os::unix::ffi::OsStrExt, path::PathBuf};

/// Calls `on_change` once the watches are in place (so a change made before then is not
/// missed), then after every batch of events in `dirs` that concern one of `names` (or
/// the directories themselves), until it returns false. Events about other files (an
/// editor's temporary file, say) wake nobody.
pub fn watch(
    dirs: &[PathBuf],
    names: &[std::ffi::OsString],
    mut on_change: impl FnMut() -> bool,
) -> io::Result<()> {
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
            if relevant(&buf[..n as usize], names) && !on_change() {
                libc::close(fd);
                return Ok(());
            }
        }
    }
}

/// Whether a batch of inotify events names one of `names`, or is about a watched
/// directory itself (moved or deleted).
fn relevant(buf: &[u8], names: &[std::ffi::OsString]) -> bool {
    const HEADER: usize = std::mem::size_of::<libc::inotify_event>();
    let mut at = 0;
    while at + HEADER <= buf.len() {
        // SAFETY: the kernel writes whole events; the header is read unaligned from bounds
        // checked bytes.
        let ev: libc::inotify_event =
            unsafe { std::ptr::read_unaligned(buf[at..].as_ptr().cast()) };
        let name_bytes = &buf[at + HEADER..(at + HEADER + ev.len as usize).min(buf.len())];
        let name = name_bytes.split(|b| *b == 0).next().unwrap_or(&[]);
        if ev.mask & (libc::IN_MOVE_SELF | libc::IN_DELETE_SELF | libc::IN_Q_OVERFLOW) != 0
            || names.iter().any(|n| n.as_bytes() == name)
        {
            return true;
        }
        at += HEADER + ev.len as usize;
    }
    false
}
