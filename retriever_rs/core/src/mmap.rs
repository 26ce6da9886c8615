//! The one place with `unsafe`: mapping shard files, guarding the mappings against files that
//! change underneath them, and the few operating-system calls that guarding needs.
//!
//! A mapped file that another process truncates makes every read of a page past its new end
//! raise SIGBUS, which kills the process by default. Three layers keep a process alive and its
//! answers right (docs/DATASTORE_FORMAT.md, "Files changed under a running process"):
//!
//! 1. The fault guard (`install_fault_guard`): a SIGBUS handler that, for a fault inside a
//!    registered mapping, maps anonymous zero pages over the whole mapping and marks it
//!    faulted. The faulting read then returns zeros (searches tolerate any bytes), and the
//!    search that read them reports the shard as out of service instead of its answer. Faults
//!    anywhere else go to the handler that was installed before (Python's faulthandler, Rust's
//!    stack-overflow guard) or to the default action.
//! 2. A read lease (`set_read_lease`): the kernel tells the holder (by `LEASE_SIGNAL`) before
//!    another process opens the file for writing or truncates it, and holds that process back
//!    until the lease is released, so the shard is retired before a byte changes.
//! 3. An inotify watch for the cases a lease cannot be had (another owner, no CAP_LEASE):
//!    the notice comes just after a write or truncation, and the guard covers the moment between.
//!
//! Retiring a mapping replaces it with zero pages in one `mmap(MAP_FIXED)` call: the address
//! range stays valid, so a search still reading it finishes (on zeros) without a dangling
//! pointer, and the file's pages are released.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicPtr, AtomicU8, AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::error::{Error, Result};

#[cfg(target_endian = "big")]
compile_error!("datastore files are little-endian; big-endian targets are not supported");

/// Opens `open` read-only without blocking (a FIFO would otherwise wait for a writer) and
/// refuses anything but a regular file (a FIFO, a device such as `/dev/zero`, a directory).
/// Returns the file and its length; errors name `path` (what the user knows the file as).
pub fn open_regular(open: &Path, path: &Path) -> Result<(File, u64)> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY)
        .open(open)
        .map_err(|e| Error::io(path, e))?;
    let meta = file.metadata().map_err(|e| Error::io(path, e))?; // fstat: the file opened
    if !meta.file_type().is_file() {
        return Err(Error::corrupt(path, "not a regular file"));
    }
    Ok((file, meta.len()))
}

/// The whole of the regular file `open` (known as `path`), refused when it holds more than
/// `cap` bytes.
pub fn read_capped(open: &Path, path: &Path, cap: u64) -> Result<Vec<u8>> {
    use std::io::Read;
    let (file, len) = open_regular(open, path)?;
    if len > cap {
        return Err(Error::corrupt(path, format!("{len} bytes is more than the {cap} bytes allowed")));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    // The length can grow after fstat: `take` keeps the cap whatever the file does.
    file.take(cap + 1).read_to_end(&mut bytes).map_err(|e| Error::io(path, e))?;
    if bytes.len() as u64 > cap {
        return Err(Error::corrupt(path, format!("more than the {cap} bytes allowed")));
    }
    Ok(bytes)
}

/// Views `bytes[offset..offset + len * size_of::<T>()]` as `&[T]`.
///
/// # Safety (of the view)
/// `T` must be a plain integer type (every bit pattern valid). The range is bounds-checked and
/// the alignment is checked, so a bad header yields an error, never undefined behaviour.
pub fn view<'a, T: Copy>(path: &Path, bytes: &'a [u8], offset: u64, len: u64) -> Result<&'a [T]> {
    let size = std::mem::size_of::<T>() as u64;
    let end = len
        .checked_mul(size)
        .and_then(|n| n.checked_add(offset))
        .filter(|&end| end <= bytes.len() as u64)
        .ok_or_else(|| Error::corrupt(path, "section extends past the end of the file"))?;
    let section = &bytes[offset as usize..end as usize];
    if (section.as_ptr() as usize) % std::mem::align_of::<T>() != 0 {
        return Err(Error::corrupt(path, "misaligned section"));
    }
    // SAFETY: the range lies inside `bytes` (checked above), the pointer is aligned for `T`
    // (checked above), `T` is a plain integer type for which every bit pattern is valid, and the
    // returned slice borrows `bytes`, so it cannot outlive the mapping.
    Ok(unsafe { std::slice::from_raw_parts(section.as_ptr() as *const T, len as usize) })
}

/// The bytes of a slice of plain integers, for writing them to a file.
pub fn bytes_of<T: Copy>(values: &[T]) -> &[u8] {
    // SAFETY: `T` is a plain integer type without padding (all callers pass u16/u32/i32), so
    // every byte of the slice is initialised; the view borrows `values` and has the same size.
    unsafe { std::slice::from_raw_parts(values.as_ptr() as *const u8, std::mem::size_of_val(values)) }
}

// ---------------------------------------------------------------------------------------------
// Mappings and the fault guard.

/// The most mappings the guard watches at once (one per open shard).
pub const MAX_MAPPINGS: usize = 4096;

/// What a mapping reads from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapState {
    /// The file's bytes.
    Mapped,
    /// Zeros, because a read faulted (the file shrank under the mapping).
    Faulted,
    /// Zeros, because the owner retired the mapping (the file is changing or changed).
    Retired,
}

const FREE: u8 = 0;
const MAPPED: u8 = 1;
const FAULTED: u8 = 2;
const RETIRED: u8 = 3;
/// Reserved while a mapping is being registered or released.
const BUSY: u8 = 4;

/// One registered mapping, as the signal handler sees it: plain atomics, no locks.
struct Slot {
    state: AtomicU8,
    start: AtomicUsize,
    len: AtomicUsize,
}

#[allow(clippy::declare_interior_mutable_const)] // the array initialiser needs a constant
const FREE_SLOT: Slot = Slot { state: AtomicU8::new(FREE), start: AtomicUsize::new(0), len: AtomicUsize::new(0) };
static SLOTS: [Slot; MAX_MAPPINGS] = [FREE_SLOT; MAX_MAPPINGS];
/// Slots at or above this index have never been used: the handler scans below it only.
static SLOTS_USED: AtomicUsize = AtomicUsize::new(0);
/// Where the handlers announce events (a non-blocking socket the watcher thread reads), or -1.
static NOTIFY_FD: AtomicI32 = AtomicI32::new(-1);
/// The SIGBUS disposition found when the guard was installed, for faults that are not ours.
static PREVIOUS_SIGBUS: AtomicPtr<libc::sigaction> = AtomicPtr::new(std::ptr::null_mut());
static INSTALL: Mutex<()> = Mutex::new(());
/// Set while a foreign SIGBUS is handed on: a previous handler that hands it back to us (it
/// was installed over ours, then ours over it) must not loop.
static CHAINING: AtomicBool = AtomicBool::new(false);

/// The byte written to the notify socket for a lease break; a fault writes its slot index.
pub const LEASE_EVENT: u32 = u32::MAX;

/// A read-only shared mapping of a whole file, registered with the fault guard.
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
    slot: usize,
}

// SAFETY: the mapping is read-only memory owned by this value; reading it from several threads
// is safe, and the only mutation (replacing it with zero pages) is done by the kernel.
unsafe impl Send for Mapping {}
// SAFETY: as above: shared references only read.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of `file` (its whole length, not zero) read-only and registers the
    /// range with the fault guard, which it installs first if needed.
    ///
    /// # Safety (of the mapping)
    /// Another process may change the file while it is mapped: the guard (module documentation)
    /// turns a truncation into zero pages instead of SIGBUS, and the watcher retires the
    /// mapping when it hears of a write. Until then a search may read changed bytes, which
    /// gives wrong answers (searches never trust the data for memory safety: every index is
    /// bounds-checked), never undefined behaviour beyond the bytes themselves.
    pub fn new(path: &Path, file: &File, len: u64) -> Result<Self> {
        let len = usize::try_from(len).ok().filter(|&n| n > 0).ok_or_else(|| Error::corrupt(path, "cannot map an empty file"))?;
        install_fault_guard();
        let slot = claim_slot().ok_or_else(|| {
            Error::corrupt(path, format!("more than {MAX_MAPPINGS} shards open in this process"))
        })?;
        // SAFETY: a fresh read-only shared mapping of an open file descriptor; the kernel picks
        // the address, so no existing memory is affected. The result is checked below.
        let ptr = unsafe {
            libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, file.as_raw_fd(), 0)
        };
        if ptr == libc::MAP_FAILED {
            let err = io::Error::last_os_error();
            release_slot(slot);
            return Err(Error::io(path, err));
        }
        // SAFETY: advice on the range just mapped; a failure only loses the hint. Searches jump
        // around the suffix array: read-ahead would only waste page cache.
        unsafe { libc::madvise(ptr, len, libc::MADV_RANDOM) };
        let s = &SLOTS[slot];
        s.start.store(ptr as usize, Ordering::Relaxed);
        s.len.store(len, Ordering::Relaxed);
        s.state.store(MAPPED, Ordering::Release); // publishes start and len to the handler
        Ok(Mapping { ptr: NonNull::new(ptr as *mut u8).expect("mmap returned null"), len, slot })
    }

    pub fn bytes(&self) -> &[u8] {
        // SAFETY: `ptr..ptr + len` is mapped readable for as long as `self` lives: by the file
        // or, once faulted or retired, by anonymous zero pages over the same range.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn state(&self) -> MapState {
        match SLOTS[self.slot].state.load(Ordering::Acquire) {
            MAPPED => MapState::Mapped,
            FAULTED => MapState::Faulted,
            _ => MapState::Retired,
        }
    }

    /// The guard's index of this mapping (what a fault announces on the notify socket).
    pub fn slot(&self) -> usize {
        self.slot
    }

    /// Replaces the file's pages with zero pages: from now on every read gives zeros, and the
    /// file may change freely. Idempotent; a faulted mapping stays `Faulted`.
    pub fn retire(&self) {
        let _ = SLOTS[self.slot].state.compare_exchange(MAPPED, RETIRED, Ordering::AcqRel, Ordering::Acquire);
        zero_over(self.ptr.as_ptr() as usize, self.len);
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        let s = &SLOTS[self.slot];
        s.state.store(BUSY, Ordering::Release); // the handler no longer claims this range
        // SAFETY: the range was mapped by `Mapping::new` and nothing borrows it any more
        // (`bytes` borrows `self`).
        unsafe { libc::munmap(self.ptr.as_ptr() as *mut libc::c_void, self.len) };
        release_slot(self.slot);
    }
}

fn claim_slot() -> Option<usize> {
    for (i, slot) in SLOTS.iter().enumerate() {
        if slot.state.compare_exchange(FREE, BUSY, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
            SLOTS_USED.fetch_max(i + 1, Ordering::AcqRel);
            return Some(i);
        }
    }
    None
}

fn release_slot(slot: usize) {
    let s = &SLOTS[slot];
    s.start.store(0, Ordering::Relaxed);
    s.len.store(0, Ordering::Relaxed);
    s.state.store(FREE, Ordering::Release);
}

/// Anonymous zero pages over `[start, start + len)`, which must be a mapping this module made.
/// Called from the SIGBUS handler too: `mmap` is a plain system call.
fn zero_over(start: usize, len: usize) -> bool {
    // SAFETY: the range is one of our own mappings (callers pass a registered slot's range), so
    // no other memory is replaced; MAP_FIXED swaps the pages atomically for concurrent readers.
    let ptr = unsafe {
        libc::mmap(
            start as *mut libc::c_void,
            len,
            libc::PROT_READ,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
            -1,
            0,
        )
    };
    ptr != libc::MAP_FAILED
}

/// Where the handlers write their events (slot indexes as 4 little-endian bytes, or
/// `LEASE_EVENT`): the watcher's non-blocking socket.
pub fn set_notify_fd(fd: RawFd) {
    NOTIFY_FD.store(fd, Ordering::Release);
}

fn notify(event: u32) {
    let fd = NOTIFY_FD.load(Ordering::Acquire);
    if fd >= 0 {
        // SAFETY: `write` is async-signal-safe; the buffer is a local array. A full socket
        // already holds a wake-up, so a failed write loses nothing the watcher would not see.
        unsafe { libc::write(fd, event.to_le_bytes().as_ptr() as *const libc::c_void, 4) };
    }
}

/// Installs the SIGBUS handler, unless it is already the current one (another library may have
/// installed its own since: it is then chained behind ours).
pub fn install_fault_guard() {
    let _lock = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    // SAFETY: sigaction with a null new action only reads the current disposition into `current`.
    let mut current: libc::sigaction = unsafe { std::mem::zeroed() };
    unsafe { libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut current) };
    if current.sa_sigaction == on_sigbus as *const () as usize {
        return;
    }
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = on_sigbus as *const () as usize;
    action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK | libc::SA_RESTART;
    // SAFETY: `action.sa_mask` is a valid signal set to fill; `previous` receives the old
    // disposition, which is kept (leaked: it must outlive every later signal) for chaining.
    unsafe {
        libc::sigemptyset(&mut action.sa_mask);
        let previous = Box::into_raw(Box::new(std::mem::zeroed::<libc::sigaction>()));
        if libc::sigaction(libc::SIGBUS, &action, previous) == 0 {
            PREVIOUS_SIGBUS.store(previous, Ordering::Release);
        } else {
            drop(Box::from_raw(previous));
        }
    }
}

extern "C" fn on_sigbus(signum: libc::c_int, info: *mut libc::siginfo_t, context: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler.
    let addr = unsafe { (*info).si_addr() } as usize;
    let used = SLOTS_USED.load(Ordering::Acquire);
    for (i, slot) in SLOTS[..used].iter().enumerate() {
        let state = slot.state.load(Ordering::Acquire);
        if state != MAPPED && state != FAULTED && state != RETIRED {
            continue;
        }
        let (start, len) = (slot.start.load(Ordering::Relaxed), slot.len.load(Ordering::Relaxed));
        if addr >= start && addr < start + len && zero_over(start, len) {
            let _ = slot.state.compare_exchange(MAPPED, FAULTED, Ordering::AcqRel, Ordering::Acquire);
            notify(i as u32);
            return; // the faulting read runs again, on zeros
        }
    }
    chain_sigbus(signum, info, context);
}

/// Hands a SIGBUS that is not ours to the disposition found at installation.
fn chain_sigbus(signum: libc::c_int, info: *mut libc::siginfo_t, context: *mut libc::c_void) {
    let looped = CHAINING.swap(true, Ordering::AcqRel);
    let previous = if looped { std::ptr::null_mut() } else { PREVIOUS_SIGBUS.load(Ordering::Acquire) };
    // SAFETY: `previous` was written by a successful sigaction and is never freed.
    let handler = if previous.is_null() { libc::SIG_DFL } else { unsafe { (*previous).sa_sigaction } };
    let flags = if previous.is_null() { 0 } else { unsafe { (*previous).sa_flags } };
    if handler == libc::SIG_DFL || handler == libc::SIG_IGN {
        // Back to the default action: a real fault faults again on return and ends the process
        // as it would have without us; a SIGBUS sent by kill() is raised again.
        // SAFETY: sigaction and raise are async-signal-safe; a zeroed action is SIG_DFL.
        unsafe {
            let mut default: libc::sigaction = std::mem::zeroed();
            default.sa_sigaction = libc::SIG_DFL;
            libc::sigaction(libc::SIGBUS, &default, std::ptr::null_mut());
            if (*info).si_code <= 0 {
                libc::raise(signum);
            }
        }
    } else if flags & libc::SA_SIGINFO != 0 {
        // SAFETY: the previous handler was installed as an SA_SIGINFO handler with this type.
        let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
            unsafe { std::mem::transmute(handler) };
        f(signum, info, context);
    } else {
        // SAFETY: a plain handler installed without SA_SIGINFO has this type.
        let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(handler) };
        f(signum);
    }
    CHAINING.store(false, Ordering::Release);
}

// ---------------------------------------------------------------------------------------------
// Leases.

/// The signal the kernel sends when a lease is to be broken (a real-time signal: Python and
/// the C library leave these alone above the first few).
pub fn lease_signal() -> libc::c_int {
    libc::SIGRTMIN() + 7
}

static LEASE_HANDLER: AtomicBool = AtomicBool::new(false);

extern "C" fn on_lease_break(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    notify(LEASE_EVENT);
}

fn install_lease_handler() -> io::Result<()> {
    let _lock = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    if LEASE_HANDLER.load(Ordering::Acquire) {
        return Ok(());
    }
    // SAFETY: a zeroed sigaction with a handler, flags and an emptied mask is a valid action;
    // the handler only writes to a socket (async-signal-safe).
    let status = unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_lease_break as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(lease_signal(), &action, std::ptr::null_mut())
    };
    if status != 0 {
        return Err(io::Error::last_os_error());
    }
    LEASE_HANDLER.store(true, Ordering::Release);
    Ok(())
}

/// `F_SETSIG`, which the `libc` crate does not define (Linux: 10).
const F_SETSIG: libc::c_int = 10;

/// Takes a read lease on `file` (opened read-only), announced by `lease_signal`. Fails with
/// EACCES when this process neither owns the file nor has CAP_LEASE, EAGAIN when the file is
/// open for writing somewhere, EINVAL on file systems without leases.
pub fn set_read_lease(file: &File) -> io::Result<()> {
    install_lease_handler()?;
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on a descriptor we own, with integer arguments only.
    if unsafe { libc::fcntl(fd, F_SETSIG, lease_signal()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETLEASE, libc::F_RDLCK) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether another process is waiting for our lease on `file` to go (the kernel then reports
/// the lease it will be downgraded to, none, while ours is still held).
pub fn lease_break_pending(file: &File) -> bool {
    // SAFETY: fcntl on a descriptor we own, with integer arguments only.
    unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETLEASE) == libc::F_UNLCK }
}

/// Gives the lease up, letting the waiting writer go on.
pub fn release_lease(file: &File) {
    // SAFETY: fcntl on a descriptor we own, with integer arguments only.
    unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETLEASE, libc::F_UNLCK) };
}

// ---------------------------------------------------------------------------------------------
// inotify, poll, flock, renameat2, thread priority.

/// A new non-blocking inotify instance.
pub fn inotify_new() -> io::Result<File> {
    // SAFETY: inotify_init1 takes flags only; the result is checked and then owned.
    let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

/// Watches `path` for `mask` events; returns the watch descriptor.
pub fn inotify_watch(inotify: &File, path: &Path, mask: u32) -> io::Result<i32> {
    let path = c_path(path)?;
    // SAFETY: a valid NUL-terminated path and our own inotify descriptor.
    let wd = unsafe { libc::inotify_add_watch(inotify.as_raw_fd(), path.as_ptr(), mask) };
    if wd < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(wd)
    }
}

pub fn inotify_unwatch(inotify: &File, wd: i32) {
    // SAFETY: integer arguments only; a stale descriptor is refused by the kernel.
    unsafe { libc::inotify_rm_watch(inotify.as_raw_fd(), wd) };
}

/// Waits up to `timeout_ms` (-1: forever) until one of `fds` is readable; returns which are.
pub fn poll_readable(fds: &[RawFd], timeout_ms: i32) -> io::Result<Vec<bool>> {
    let mut polls: Vec<libc::pollfd> = fds.iter().map(|&fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 }).collect();
    // SAFETY: `polls` is a valid array of `polls.len()` pollfd structures.
    let n = unsafe { libc::poll(polls.as_mut_ptr(), polls.len() as libc::nfds_t, timeout_ms) };
    if n < 0 {
        let err = io::Error::last_os_error();
        return if err.kind() == io::ErrorKind::Interrupted { Ok(vec![false; fds.len()]) } else { Err(err) };
    }
    Ok(polls.iter().map(|p| p.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0).collect())
}

/// `flock(LOCK_EX | LOCK_NB)`: true when the lock is now ours, false when another open file
/// holds it. The lock goes with the file's last descriptor (a killed process releases it).
pub fn try_lock_exclusive(file: &File) -> io::Result<bool> {
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(err)
    }
}

/// Swaps the directory entries `a` and `b` atomically (`renameat2(RENAME_EXCHANGE)`); both
/// must exist. Fails with EINVAL or ENOSYS where the file system or kernel cannot.
pub fn exchange(a: &Path, b: &Path) -> io::Result<()> {
    let (a, b) = (c_path(a)?, c_path(b)?);
    // SAFETY: valid NUL-terminated paths relative to the current directory (or absolute).
    let status = unsafe { libc::renameat2(libc::AT_FDCWD, a.as_ptr(), libc::AT_FDCWD, b.as_ptr(), libc::RENAME_EXCHANGE) };
    if status == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Lowers the calling thread's CPU priority to `nice` (Linux applies it per thread).
pub fn nice_current_thread(nice: i32) {
    // SAFETY: gettid and setpriority take integers only; failing leaves the priority as it was.
    unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice);
    }
}
