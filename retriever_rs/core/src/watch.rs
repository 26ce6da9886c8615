//! Shard files under watch: in service until their file changes, then out of service with the
//! reason, announced to whoever holds the datastore.
//!
//! One watcher thread per process hears of every change (the mechanisms are in `mmap`: the
//! SIGBUS guard, read leases, inotify) and takes the shard out of service: its mapping becomes
//! zero pages, its lease is released, and the datastore's `Events` get a `ShardChange` and a
//! wake-up byte on a socket, so that an event loop can react without polling. A search that read
//! a shard while it went out of service reports it instead of its answer (`Datastore::search`).

use crate::mmap::{self, Mapping, MapState};
use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

/// How shard files are watched (`Datastore::open_with`). All on by default.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Watching {
    /// Take a read lease, so that a writer is held back until the shard is out of service.
    pub leases: bool,
    /// Watch for writes with inotify (the notice comes after the write).
    pub inotify: bool,
}

impl Default for Watching {
    fn default() -> Self {
        Watching { leases: true, inotify: true }
    }
}

/// A shard that went out of service (or, after `Datastore::reload`, back in).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardChange {
    pub shard: String,
    pub path: PathBuf,
    pub serving: bool,
    /// What changed ("truncated from 1234 to 1000 bytes while mapped", ...); empty when serving.
    pub reason: String,
}

/// The changes of one datastore's shards, and the socket that becomes readable when there are.
pub struct Events {
    changes: Mutex<Vec<ShardChange>>,
    wake_pending: AtomicBool,
    wake_reader: UnixStream,
    wake_writer: UnixStream,
}

impl Events {
    pub fn new() -> io::Result<Arc<Self>> {
        let (wake_reader, wake_writer) = UnixStream::pair()?;
        wake_reader.set_nonblocking(true)?;
        wake_writer.set_nonblocking(true)?;
        Ok(Arc::new(Events { changes: Mutex::new(Vec::new()), wake_pending: AtomicBool::new(false), wake_reader, wake_writer }))
    }

    /// Readable when `take` has changes to return.
    pub fn fileno(&self) -> RawFd {
        self.wake_reader.as_raw_fd()
    }

    /// Every change since the last call, oldest first.
    pub fn take(&self) -> Vec<ShardChange> {
        // Drain before taking: a change pushed after the take writes a fresh byte.
        let mut buf = [0u8; 64];
        while matches!((&self.wake_reader).read(&mut buf), Ok(n) if n > 0) {}
        self.wake_pending.store(false, Ordering::Release);
        std::mem::take(&mut *self.changes.lock().unwrap_or_else(|e| e.into_inner()))
    }

    pub(crate) fn push(&self, change: ShardChange) {
        self.changes.lock().unwrap_or_else(|e| e.into_inner()).push(change);
        if !self.wake_pending.swap(true, Ordering::AcqRel) {
            let _ = (&self.wake_writer).write(&[1]);
        }
    }
}

/// One mapped shard file, shared by its `Shard` and the watcher.
pub struct Watched {
    id: u64,
    pub name: String,
    pub path: PathBuf,
    pub map: Mapping,
    file: File,
    /// The file's length when it was opened.
    len: u64,
    leased: AtomicBool,
    wd: Mutex<Option<i32>>,
    reason: Mutex<Option<String>>,
    events: Arc<Events>,
}

impl Watched {
    /// Maps `file` (of `len` bytes, opened at `open_path`, known as `path`) and puts it under
    /// watch as `watching` says.
    pub fn new(
        name: &str,
        path: &Path,
        open_path: &Path,
        file: File,
        len: u64,
        events: Arc<Events>,
        watching: Watching,
    ) -> crate::Result<Arc<Self>> {
        static IDS: AtomicU64 = AtomicU64::new(0);
        let map = Mapping::new(path, &file, len)?;
        let shard = Arc::new(Watched {
            id: IDS.fetch_add(1, Ordering::Relaxed),
            name: name.to_string(),
            path: path.to_path_buf(),
            map,
            file,
            len,
            leased: AtomicBool::new(false),
            wd: Mutex::new(None),
            reason: Mutex::new(None),
            events,
        });
        watcher().add(&shard, open_path, watching);
        Ok(shard)
    }

    pub fn is_serving(&self) -> bool {
        self.map.state() == MapState::Mapped
    }

    /// Why the shard is out of service (None while it serves). A fault that the watcher has not
    /// described yet reads as a generic reason.
    pub fn reason(&self) -> Option<String> {
        if self.is_serving() {
            return None;
        }
        let reason = self.reason.lock().unwrap_or_else(|e| e.into_inner()).clone();
        Some(reason.unwrap_or_else(|| self.fault_reason()))
    }

    /// Whether this shard holds a read lease (writers are held back until it is released).
    pub fn has_lease(&self) -> bool {
        self.leased.load(Ordering::Acquire)
    }

    /// The file the mapping was made from (still open: the same inode, whatever its path is now).
    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn expected_len(&self) -> u64 {
        self.len
    }

    /// Takes the shard out of service for `reason` (the first reason given is kept): zero pages
    /// over the mapping, then the lease released and the watch removed, then the announcement.
    pub fn take_out_of_service(&self, reason: String) {
        self.map.retire();
        {
            let mut kept = self.reason.lock().unwrap_or_else(|e| e.into_inner());
            if kept.is_some() {
                return;
            }
            *kept = Some(reason.clone());
        }
        if self.leased.swap(false, Ordering::AcqRel) {
            mmap::release_lease(&self.file);
        }
        watcher().forget_watch(self);
        self.events.push(ShardChange { shard: self.name.clone(), path: self.path.clone(), serving: false, reason });
    }

    fn fault_reason(&self) -> String {
        match self.file.metadata().map(|m| m.len()) {
            Ok(now) if now != self.len => {
                format!("the file changed size from {} to {now} bytes while mapped (read past its end)", self.len)
            }
            _ => "a read of the mapped file failed (SIGBUS): the file was truncated while mapped".into(),
        }
    }

    fn write_reason(&self) -> String {
        match self.file.metadata().map(|m| m.len()) {
            Ok(now) if now != self.len => {
                format!("the file was truncated or resized from {} to {now} bytes by another process", self.len)
            }
            _ => "the file was written in place by another process".into(),
        }
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        if self.leased.swap(false, Ordering::AcqRel) {
            mmap::release_lease(&self.file);
        }
        watcher().remove(self);
    }
}

/// The process's one watcher: the registry of watched shards and the thread that serves it.
struct Watcher {
    /// Written by the signal handlers (fault, lease break) and by `add` (a new lease to check).
    notify_writer: UnixStream,
    inotify: Option<File>,
    shards: Mutex<Registry>,
}

#[derive(Default)]
struct Registry {
    by_id: HashMap<u64, Weak<Watched>>,
    /// inotify watch descriptor -> the shards watched through it (one inode opened twice gets
    /// one descriptor).
    by_wd: HashMap<i32, Vec<u64>>,
}

fn watcher() -> &'static Watcher {
    static WATCHER: OnceLock<Watcher> = OnceLock::new();
    WATCHER.get_or_init(|| {
        let (reader, writer) = UnixStream::pair().expect("socketpair for the shard watcher");
        reader.set_nonblocking(true).expect("non-blocking socket");
        writer.set_nonblocking(true).expect("non-blocking socket");
        mmap::set_notify_fd(writer.as_raw_fd());
        let inotify = mmap::inotify_new().ok();
        let inotify_fd = inotify.as_ref().map(|f| f.as_raw_fd());
        std::thread::Builder::new()
            .name("shard-watcher".into())
            .spawn(move || watch_loop(reader, inotify_fd))
            .expect("spawn the shard watcher");
        Watcher { notify_writer: writer, inotify, shards: Mutex::new(Registry::default()) }
    })
}

impl Watcher {
    fn add(&self, shard: &Arc<Watched>, open_path: &Path, watching: Watching) {
        let mut registry = self.shards.lock().unwrap_or_else(|e| e.into_inner());
        registry.by_id.insert(shard.id, Arc::downgrade(shard));
        if watching.inotify {
            if let Some(inotify) = &self.inotify {
                if let Ok(wd) = mmap::inotify_watch(inotify, open_path, libc::IN_MODIFY) {
                    *shard.wd.lock().unwrap_or_else(|e| e.into_inner()) = Some(wd);
                    registry.by_wd.entry(wd).or_default().push(shard.id);
                }
            }
        }
        drop(registry);
        if watching.leases && mmap::set_read_lease(&shard.file).is_ok() {
            shard.leased.store(true, Ordering::Release);
        }
        // A write that began between opening and leasing, or a fault already taken: look now.
        let _ = (&self.notify_writer).write(&[0]);
    }

    fn forget_watch(&self, shard: &Watched) {
        let Some(wd) = shard.wd.lock().unwrap_or_else(|e| e.into_inner()).take() else { return };
        let mut registry = self.shards.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(ids) = registry.by_wd.get_mut(&wd) {
            ids.retain(|&id| id != shard.id);
            if ids.is_empty() {
                registry.by_wd.remove(&wd);
                if let Some(inotify) = &self.inotify {
                    mmap::inotify_unwatch(inotify, wd);
                }
            }
        }
    }

    fn remove(&self, shard: &Watched) {
        self.forget_watch(shard);
        self.shards.lock().unwrap_or_else(|e| e.into_inner()).by_id.remove(&shard.id);
    }

    fn live_shards(&self) -> Vec<Arc<Watched>> {
        let registry = self.shards.lock().unwrap_or_else(|e| e.into_inner());
        registry.by_id.values().filter_map(Weak::upgrade).collect()
    }

    fn shards_of_wd(&self, wd: i32) -> Vec<Arc<Watched>> {
        let registry = self.shards.lock().unwrap_or_else(|e| e.into_inner());
        let ids = registry.by_wd.get(&wd).cloned().unwrap_or_default();
        ids.iter().filter_map(|id| registry.by_id.get(id).and_then(Weak::upgrade)).collect()
    }
}

fn watch_loop(notify_reader: UnixStream, inotify_fd: Option<RawFd>) {
    let mut fds = vec![notify_reader.as_raw_fd()];
    fds.extend(inotify_fd);
    let mut buf = vec![0u8; 4096];
    loop {
        let Ok(ready) = mmap::poll_readable(&fds, -1) else { continue };
        if ready[0] {
            while matches!((&notify_reader).read(&mut buf), Ok(n) if n > 0) {}
            // Every wake-up looks at every shard: a wake-up byte may stand for many events.
            for shard in watcher().live_shards() {
                if shard.map.state() == MapState::Faulted {
                    shard.take_out_of_service(shard.fault_reason());
                } else if shard.has_lease() && mmap::lease_break_pending(&shard.file) {
                    shard.take_out_of_service(format!(
                        "another process opened the file for writing or truncated it (read lease broken); {}",
                        "the shard was unmapped first"
                    ));
                }
            }
        }
        if ready.get(1) == Some(&true) {
            if let Some(inotify) = &watcher().inotify {
                for wd in read_inotify(inotify, &mut buf) {
                    for shard in watcher().shards_of_wd(wd) {
                        shard.take_out_of_service(shard.write_reason());
                    }
                }
            }
        }
    }
}

/// The watch descriptors of the pending inotify events (`struct inotify_event`: wd, mask,
/// cookie, len, then `len` bytes of name).
fn read_inotify(inotify: &File, buf: &mut [u8]) -> Vec<i32> {
    let mut wds = Vec::new();
    while let Ok(n) = (&*inotify).read(buf) {
        if n == 0 {
            break;
        }
        let mut at = 0;
        while at + 16 <= n {
            let wd = i32::from_le_bytes(buf[at..at + 4].try_into().unwrap());
            let name_len = u32::from_le_bytes(buf[at + 12..at + 16].try_into().unwrap()) as usize;
            wds.push(wd);
            at += 16 + name_len;
        }
    }
    wds.sort_unstable();
    wds.dedup();
    wds
}
