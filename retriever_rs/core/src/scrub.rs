//! The background scrub: re-reads every shard in service, slowly, and takes a shard out of
//! service when the checksum of its tokens or suffix array no longer matches its header.
//!
//! Leases and inotify hear of writes made through this machine's file system; the scrub finds
//! the rest (a change made while nothing watched, on another host of a network file system, or
//! by a writer that had the file open before the datastore was). It runs on one thread at the
//! lowest CPU priority (nice 19) and reads at most `bytes_per_s`, through the file (`pread`),
//! not the mapping, so that it neither faults nor fills the process's resident memory.
//! docs/BENCHMARKS.md gives its cost.

use crate::datastore::Datastore;
use crate::shard::Shard;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use xxhash_rust::xxh3::Xxh3Default;

/// Bytes read per `pread`, between two looks at the rate and the stop flag.
const CHUNK: usize = 1 << 20;
/// The longest single sleep, so that `stop` is heard quickly.
const NAP: Duration = Duration::from_millis(50);

/// What the scrub has done so far.
#[derive(Default)]
pub struct ScrubStats {
    /// Bytes read (checksummed) since the scrub started.
    pub bytes: AtomicU64,
    /// Complete passes over every shard in service.
    pub passes: AtomicU64,
    /// Shards the scrub took out of service.
    pub found: AtomicU64,
}

/// A running scrub of one datastore; stopped (and joined) when dropped.
pub struct Scrub {
    stop: Arc<AtomicBool>,
    stats: Arc<ScrubStats>,
    handle: Option<JoinHandle<()>>,
}

impl Scrub {
    /// Starts scrubbing `datastore` at most `bytes_per_s` (0: as fast as it can), pausing
    /// `pause` between passes.
    pub fn start(datastore: Arc<Datastore>, bytes_per_s: u64, pause: Duration) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(ScrubStats::default());
        let (stop_flag, counters) = (stop.clone(), stats.clone());
        let handle = std::thread::Builder::new().name("shard-scrub".into()).spawn(move || {
            crate::mmap::nice_current_thread(19);
            let mut pacer = Pacer { bytes_per_s, start: Instant::now(), read: 0, stop: &stop_flag };
            while !stop_flag.load(Ordering::Relaxed) {
                for shard in &datastore.shards {
                    if !shard.is_serving() {
                        continue;
                    }
                    match scrub_shard(shard, &mut pacer, &counters) {
                        Some(Ok(())) => {}
                        Some(Err(reason)) => {
                            counters.found.fetch_add(1, Ordering::Relaxed);
                            shard.take_out_of_service(reason);
                        }
                        None => return, // stopped
                    }
                }
                counters.passes.fetch_add(1, Ordering::Relaxed);
                if !pacer.sleep(pause) {
                    return;
                }
            }
        })?;
        Ok(Scrub { stop, stats, handle: Some(handle) })
    }

    pub fn stats(&self) -> &ScrubStats {
        &self.stats
    }

    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

impl Drop for Scrub {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Holds the reading to `bytes_per_s` over the scrub's whole life.
struct Pacer<'a> {
    bytes_per_s: u64,
    start: Instant,
    read: u64,
    stop: &'a AtomicBool,
}

impl Pacer<'_> {
    /// Counts `n` bytes read and sleeps until the rate allows more; false once stopped.
    fn read(&mut self, n: u64) -> bool {
        self.read += n;
        if self.bytes_per_s == 0 {
            return !self.stop.load(Ordering::Relaxed);
        }
        let due = self.start + Duration::from_secs_f64(self.read as f64 / self.bytes_per_s as f64);
        self.sleep(due.saturating_duration_since(Instant::now()))
    }

    /// Sleeps `duration` in naps, listening for `stop`; false once stopped.
    fn sleep(&mut self, duration: Duration) -> bool {
        let until = Instant::now() + duration;
        loop {
            if self.stop.load(Ordering::Relaxed) {
                return false;
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return true;
            }
            std::thread::sleep(left.min(NAP));
        }
    }
}

/// Checksums one shard's two sections: `Some(Ok)` when both match the header, `Some(Err(why))`
/// when one does not (or the file is now shorter), `None` when the scrub was stopped.
fn scrub_shard(shard: &Shard, pacer: &mut Pacer, stats: &ScrubStats) -> Option<Result<(), String>> {
    let h = &shard.header;
    let tokens = (h.tokens_offset(), h.n_tokens * h.token_width as u64, h.tokens_checksum, "tokens");
    let sa = (h.sa_offset(), h.n_tokens * 4, h.sa_checksum, "suffix array");
    for (offset, len, expected, section) in [tokens, sa] {
        match section_checksum(shard, offset, len, pacer, stats)? {
            Ok(found) if found == expected => {}
            Ok(found) => {
                return Some(Err(format!(
                    "the checksum of its {section} changed (the scrub found {found:016x}, the header says \
                     {expected:016x}): the file was modified in place"
                )))
            }
            Err(why) => return Some(Err(why)),
        }
        if !shard.is_serving() {
            return Some(Ok(())); // went out of service meanwhile, for its own reason
        }
    }
    Some(Ok(()))
}

fn section_checksum(
    shard: &Shard,
    offset: u64,
    len: u64,
    pacer: &mut Pacer,
    stats: &ScrubStats,
) -> Option<Result<u64, String>> {
    let file = shard.watched().file();
    let mut hasher = Xxh3Default::new();
    let mut buf = vec![0u8; CHUNK];
    let mut at = 0u64;
    while at < len {
        let want = (len - at).min(CHUNK as u64) as usize;
        let n = match file.read_at(&mut buf[..want], offset + at) {
            Ok(0) => {
                return Some(Err(format!(
                    "the file is shorter than its header says (it ends at byte {}): it was truncated",
                    offset + at
                )))
            }
            Ok(n) => n,
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(err) => return Some(Err(format!("the scrub could not read the file: {err}"))),
        };
        hasher.update(&buf[..n]);
        at += n as u64;
        stats.bytes.fetch_add(n as u64, Ordering::Relaxed);
        if !pacer.read(n as u64) {
            return None;
        }
    }
    Some(Ok(hasher.digest()))
}
