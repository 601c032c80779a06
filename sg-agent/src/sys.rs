//! Every call into libc, and the only module allowed `unsafe`: bpffs, the local
//! interfaces (in the agent's network namespace), the boot clock, inotify, the allocator.
#![allow(unsafe_code)]

use std::{
    ffi::{CStr, CString, OsString},
    io,
    os::unix::{ffi::OsStrExt, fs::DirBuilderExt},
    path::{Path, PathBuf},
};

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Whether `path` lies on a bpffs.
pub fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into the zeroed struct we own; `c` is a valid C string.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC
    }
}

fn mount_bpffs(target: &Path) -> io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(target)?;
    let t = CString::new(target.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let opts = CString::new("mode=0700").expect("static");
    // SAFETY: all pointers are valid NUL-terminated strings for the duration of the call.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            t.as_ptr(),
            c"bpf".as_ptr(),
            0,
            opts.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Makes sure `pin_dir` is a 0700 directory on a bpffs, mounting one when needed: at
/// `/sys/fs/bpf` for pin directories below it, else on the pin directory itself.
pub fn ensure_pin_dir(pin_dir: &Path) -> io::Result<()> {
    let sys = Path::new("/sys/fs/bpf");
    let mount_at: PathBuf = if pin_dir.starts_with(sys) {
        sys.into()
    } else {
        pin_dir.into()
    };
    let on_bpffs = |p: &Path| p.exists() && is_bpffs(p);
    if !(on_bpffs(pin_dir) || pin_dir.parent().is_some_and(on_bpffs) || on_bpffs(&mount_at)) {
        log::info!("mounting bpffs at {}", mount_at.display());
        mount_bpffs(&mount_at).map_err(|e| {
            if e.kind() == io::ErrorKind::PermissionDenied {
                io::Error::new(
                    e.kind(),
                    format!(
                        "no bpffs at {} and mounting one needs CAP_SYS_ADMIN ({e}); mount it first (`mount -t bpf bpf {}`; systemd does at boot)",
                        mount_at.display(),
                        mount_at.display()
                    ),
                )
            } else {
                e
            }
        })?;
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(pin_dir)?;
    std::fs::set_permissions(pin_dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    Ok(())
}

/// A network interface of this host.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct HostInterface {
    pub name: String,
    pub ifindex: u32,
    /// Lower-case `aa:bb:cc:dd:ee:ff`; None for interfaces without an Ethernet address.
    pub mac: Option<String>,
    /// A bond's master (IFF_MASTER): XDP there sees the slaves' ifindexes.
    pub bond_master: bool,
    /// A bond's slave (IFF_SLAVE): it shares the master's MAC; the master is enforced.
    pub enslaved: bool,
}

/// Every interface in the current network namespace (if_nameindex, then SIOCGIFHWADDR
/// and SIOCGIFFLAGS, which, unlike /sys, always answer for the caller's own namespace).
/// The ioctls go through a Unix socket: the kernel answers them for a socket of any
/// family, and a service restricted to AF_UNIX and AF_NETLINK (the systemd unit) may not
/// open an AF_INET one. Without that socket no MAC address could be read and nothing
/// would be enforced: that is an error, not an empty list.
pub fn interfaces() -> io::Result<Vec<HostInterface>> {
    // SAFETY: a datagram socket for the ioctls, closed below.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::other(format!(
            "opening a socket to read interface addresses: {}",
            io::Error::last_os_error()
        )));
    }
    let mut out = Vec::new();
    // SAFETY: if_nameindex returns an array terminated by a zero entry, freed below.
    let listed = unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            Err(io::Error::last_os_error())
        } else {
            let mut p = list;
            while (*p).if_index != 0 && !(*p).if_name.is_null() {
                let name = CStr::from_ptr((*p).if_name).to_string_lossy().into_owned();
                let flags = flags_of(fd, &name);
                out.push(HostInterface {
                    mac: mac_of(fd, &name),
                    bond_master: flags & libc::IFF_MASTER != 0,
                    enslaved: flags & libc::IFF_SLAVE != 0,
                    name,
                    ifindex: (*p).if_index,
                });
                p = p.add(1);
            }
            libc::if_freenameindex(list);
            Ok(())
        }
    };
    // SAFETY: closing the socket opened above.
    unsafe { libc::close(fd) };
    listed?;
    out.sort();
    Ok(out)
}

/// An `ifreq` naming `name`.
fn ifreq_of(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (i, b) in name.bytes().take(libc::IFNAMSIZ - 1).enumerate() {
        req.ifr_name[i] = b as libc::c_char;
    }
    req
}

fn mac_of(fd: i32, name: &str) -> Option<String> {
    let mut req = ifreq_of(name);
    // SAFETY: SIOCGIFHWADDR fills the ifreq we own.
    let rc = unsafe { libc::ioctl(fd, libc::SIOCGIFHWADDR, &mut req) };
    if rc != 0 {
        return None;
    }
    // SAFETY: after SIOCGIFHWADDR the union holds the hardware address.
    let sa = unsafe { req.ifr_ifru.ifru_hwaddr };
    if sa.sa_family != libc::ARPHRD_ETHER {
        return None;
    }
    let b: Vec<u8> = sa.sa_data[..6].iter().map(|c| *c as u8).collect();
    if b.iter().all(|x| *x == 0) {
        return None;
    }
    Some(
        b.iter()
            .map(|x| format!("{x:02x}"))
            .collect::<Vec<_>>()
            .join(":"),
    )
}

/// The interface flags (SIOCGIFFLAGS) of `name`; 0 when they cannot be read.
fn flags_of(fd: i32, name: &str) -> i32 {
    let mut req = ifreq_of(name);
    // SAFETY: SIOCGIFFLAGS fills the ifreq we own.
    let rc = unsafe { libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req) };
    if rc != 0 {
        return 0;
    }
    // SAFETY: after SIOCGIFFLAGS the union holds the flags.
    unsafe { req.ifr_ifru.ifru_flags as i32 }
}

/// CLOCK_BOOTTIME in nanoseconds: the clock the datapath uses.
pub fn boot_ns() -> u64 {
    // SAFETY: clock_gettime writes into the struct we own.
    unsafe {
        let mut ts: libc::timespec = std::mem::zeroed();
        libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts);
        ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
    }
}

// ---- BPF ----

/// Updates (or inserts) `keys[i]` → `values[i]` in the hash map `map` in one
/// `BPF_MAP_UPDATE_BATCH` call (Linux 5.6), in order; the types are the map's own key and
/// value layouts. A start programs a few hundred thousand exact addresses: one call each
/// was most of the time spent programming the maps.
pub fn map_update_batch<K: aya::Pod, V: aya::Pod>(
    map: std::os::fd::BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
    /// `union bpf_attr`'s batch member.
    #[repr(C)]
    #[derive(Default)]
    struct Batch {
        in_batch: u64,
        out_batch: u64,
        keys: u64,
        values: u64,
        count: u32,
        map_fd: u32,
        elem_flags: u64,
        flags: u64,
    }
    assert_eq!(keys.len(), values.len());
    let mut done = 0;
    while done < keys.len() {
        let mut attr = Batch {
            keys: keys[done..].as_ptr() as u64,
            values: values[done..].as_ptr() as u64,
            count: (keys.len() - done).min(u32::MAX as usize) as u32,
            map_fd: map.as_raw_fd() as u32,
            ..Batch::default()
        };
        // SAFETY: the attribute points at `count` keys and values of the map's layouts,
        // which outlive the call; the kernel writes only `count` back.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_UPDATE_BATCH,
                &mut attr as *mut Batch,
                size_of::<Batch>() as u32,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        if attr.count == 0 {
            return Err(io::Error::other("the batch update made no progress"));
        }
        done += attr.count as usize;
    }
    Ok(())
}

/// The bytes of a `BPF_F_MMAPABLE` array map, mapped shared: what is stored here the
/// datapath sees at once, byte by byte, beside its own stores (a whole-value update from
/// user space would undo the datapath's writes to the same value).
pub struct SharedBytes {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is owned by this value and only reached through byte atomics.
unsafe impl Send for SharedBytes {}

impl SharedBytes {
    /// Maps `len` bytes of the map `map` read-write.
    pub fn map(map: std::os::fd::BorrowedFd<'_>, len: usize) -> io::Result<SharedBytes> {
        use std::os::fd::AsRawFd;
        // SAFETY: a new shared mapping of the map's own memory; the kernel checks `len`
        // against the map's size and the map's flag.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(SharedBytes {
            ptr: ptr.cast(),
            len,
        })
    }

    fn byte(&self, at: usize) -> &std::sync::atomic::AtomicU8 {
        assert!(at < self.len, "byte {at} of a {}-byte mapping", self.len);
        // SAFETY: in bounds of a live mapping; AtomicU8 has the layout of u8.
        unsafe { &*self.ptr.add(at).cast::<std::sync::atomic::AtomicU8>() }
    }

    pub fn load(&self, at: usize) -> u8 {
        self.byte(at).load(std::sync::atomic::Ordering::Acquire)
    }

    pub fn store(&self, at: usize, v: u8) {
        self.byte(at).store(v, std::sync::atomic::Ordering::Release)
    }
}

impl Drop for SharedBytes {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, unmapped once.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

// ---- inotify ----

/// Calls `on_change` once the watches are in place (so a change made before then is not
/// missed), then after every batch of events in `dirs` that concern one of `names` (or
/// the directories themselves), until it returns false. Events about other files (an
/// editor's temporary file, say) wake nobody.
pub fn inotify_watch(
    dirs: &[PathBuf],
    names: &[OsString],
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
fn relevant(buf: &[u8], names: &[OsString]) -> bool {
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

/// Hands memory freed after a large parse or compile back to the system, so the agent's
/// resident size is what it keeps, not its peak.
pub fn release_free_memory() {
    // SAFETY: malloc_trim only returns free heap pages to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

// ---- files ----

/// Whether some process has `path` open for writing: a read lease (fcntl F_SETLEASE) is
/// refused with EAGAIN exactly then. Leases need CAP_LEASE or the file's owner, which the
/// agent is; where leases are unavailable (EINVAL, EACCES) the answer is "no".
pub fn being_written(path: &Path) -> io::Result<bool> {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(path)?;
    // SAFETY: fcntl on a descriptor we own, with integer arguments.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETLEASE, libc::F_RDLCK) };
    if rc == 0 {
        // SAFETY: as above; releases the lease just taken.
        unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETLEASE, libc::F_UNLCK) };
        return Ok(false);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EAGAIN) => Ok(true),
        Some(libc::EINVAL | libc::EACCES | libc::ENOLCK) => Ok(false),
        _ => Err(e),
    }
}

/// An exclusive lock on `path` (created 0600), held as long as the returned file is open;
/// Err(WouldBlock) when another process holds it.
pub fn lock_exclusive(path: &Path) -> io::Result<std::fs::File> {
    use std::os::{fd::AsRawFd, unix::fs::OpenOptionsExt};
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)?;
    // SAFETY: flock on a descriptor we own.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(file)
}

/// Sends SIGTERM to `pid`.
pub fn terminate(pid: u32) -> io::Result<()> {
    // SAFETY: kill(2) with a plain pid and signal number.
    if unsafe { libc::kill(pid as i32, libc::SIGTERM) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
