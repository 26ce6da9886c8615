//! Building a datastore: documents in, shard files (tokens + suffix array) and a manifest out.
//!
//! Memory is bounded: tokens are buffered up to `shard_tokens`, then the shard's suffix array is
//! built on a worker thread while the next shard fills; at most `parallel_shards` shards are in
//! flight. Everything is written to `<out>.tmp-<pid>` and renamed to `<out>` only when complete,
//! so an interrupted build never leaves a datastore that opens.
//!
//! Replacing an existing datastore (`overwrite`) swaps the two directories in one step
//! (`renameat2(RENAME_EXCHANGE)`), then deletes the old one: at every instant `<out>` is the
//! complete old or the complete new datastore. Where the file system cannot exchange, the old
//! one is renamed aside first (`<out>` is then missing for the moment between two renames).
//!
//! A build holds an exclusive `flock` on `<out>.tmp-<pid>/.lock` while it runs; a build killed
//! on the way leaves its temporary directory behind, and the next build for the same `<out>`
//! removes every `<out>.tmp-*` whose lock nobody holds (whose owner is gone: a lock, unlike a
//! process id, is never reused).

use crate::error::{Error, Result};
use crate::format::{
    checksum, separator_for, token_width_for, Manifest, ShardEntry, ShardHeader, FORMAT_VERSION,
    HEADER_LEN, MANIFEST_NAME, MAX_SHARD_TOKENS,
};
use crate::mmap::{bytes_of, exchange, try_lock_exclusive};
use std::collections::VecDeque;
use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

/// The lock file inside a build's temporary directory.
const LOCK_NAME: &str = ".lock";

#[derive(Clone, Debug)]
pub struct BuildOptions {
    pub vocab_size: u32,
    pub tokenizer_name: String,
    pub tokenizer_fingerprint: String,
    /// Token positions per shard (separators included).
    pub shard_tokens: u64,
    pub parallel_shards: usize,
    /// Replace an existing datastore at the output path.
    pub overwrite: bool,
}

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions {
            vocab_size: 0,
            tokenizer_name: String::new(),
            tokenizer_fingerprint: String::new(),
            shard_tokens: 1 << 28,
            parallel_shards: 2,
            overwrite: false,
        }
    }
}

pub struct Builder {
    out_dir: PathBuf,
    tmp_dir: PathBuf,
    /// Holds the `flock` that tells later builds this one is alive.
    _lock: File,
    opts: BuildOptions,
    buffer: Vec<u32>,
    buffer_docs: u64,
    in_flight: VecDeque<JoinHandle<Result<ShardEntry>>>,
    done: Vec<ShardEntry>,
    next_shard: usize,
    finished: bool,
}

impl Builder {
    pub fn create(out_dir: &Path, opts: BuildOptions) -> Result<Self> {
        if opts.vocab_size == 0 {
            return Err(Error::InvalidInput("vocab_size must be positive".into()));
        }
        if opts.shard_tokens < 2 || opts.shard_tokens > MAX_SHARD_TOKENS {
            return Err(Error::InvalidInput(format!(
                "shard_tokens must be in 2..={MAX_SHARD_TOKENS}, got {}",
                opts.shard_tokens
            )));
        }
        if out_dir.symlink_metadata().is_ok() {
            if !opts.overwrite {
                return Err(Error::InvalidInput(format!(
                    "{} already exists (pass overwrite to replace it)",
                    out_dir.display()
                )));
            }
            check_replaceable(out_dir)?;
        }
        if out_dir.file_name().is_none() {
            return Err(Error::InvalidInput(format!("{} names no directory to build", out_dir.display())));
        }
        if let Some(parent) = out_dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        remove_dead_temporaries(out_dir);
        let tmp_dir = temporary_name(out_dir, &std::process::id().to_string());
        if tmp_dir.symlink_metadata().is_ok() {
            // A previous process with our id left it: its lock is gone with it.
            remove_any(&tmp_dir).map_err(|e| Error::io(&tmp_dir, e))?;
        }
        fs::create_dir(&tmp_dir).map_err(|e| Error::io(&tmp_dir, e))?;
        let lock_path = tmp_dir.join(LOCK_NAME);
        let lock = File::create(&lock_path).map_err(|e| Error::io(&lock_path, e))?;
        if !try_lock_exclusive(&lock).map_err(|e| Error::io(&lock_path, e))? {
            return Err(Error::InvalidInput(format!("{} is locked by another build", tmp_dir.display())));
        }
        Ok(Builder {
            out_dir: out_dir.to_path_buf(),
            tmp_dir,
            _lock: lock,
            opts,
            buffer: Vec::new(),
            buffer_docs: 0,
            in_flight: VecDeque::new(),
            done: Vec::new(),
            next_shard: 0,
            finished: false,
        })
    }

    /// Appends one document (token ids). Empty documents are skipped.
    pub fn add_document(&mut self, doc: &[i64]) -> Result<()> {
        if doc.is_empty() {
            return Ok(());
        }
        let vocab = self.opts.vocab_size as i64;
        if let Some((i, &t)) = doc.iter().enumerate().find(|(_, &t)| !(0..vocab).contains(&t)) {
            return Err(Error::InvalidInput(format!(
                "token {t} at position {i} of a document is outside the vocabulary [0, {vocab})"
            )));
        }
        let needed = doc.len() as u64 + 1;
        if needed > self.opts.shard_tokens {
            return Err(Error::InvalidInput(format!(
                "a document of {} tokens does not fit in a shard of {} tokens",
                doc.len(),
                self.opts.shard_tokens
            )));
        }
        if self.buffer.len() as u64 + needed > self.opts.shard_tokens {
            self.flush()?;
        }
        self.buffer.extend(doc.iter().map(|&t| t as u32));
        self.buffer.push(separator_for(token_width_for(self.opts.vocab_size)));
        self.buffer_docs += 1;
        Ok(())
    }

    /// Tokens buffered or written so far (separators included).
    pub fn tokens_added(&self) -> u64 {
        self.done.iter().map(|s| s.n_tokens).sum::<u64>()
            + self.in_flight.len() as u64 * self.opts.shard_tokens
            + self.buffer.len() as u64
    }

    fn flush(&mut self) -> Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        while self.in_flight.len() >= self.opts.parallel_shards.max(1) {
            self.join_oldest()?;
        }
        let tokens = std::mem::take(&mut self.buffer);
        let n_docs = std::mem::replace(&mut self.buffer_docs, 0);
        let name = format!("shard-{:05}", self.next_shard);
        self.next_shard += 1;
        let path = self.tmp_dir.join(format!("{name}.rds"));
        let opts = self.opts.clone();
        self.in_flight.push_back(std::thread::spawn(move || write_shard(&path, &name, tokens, n_docs, &opts)));
        Ok(())
    }

    fn join_oldest(&mut self) -> Result<()> {
        if let Some(handle) = self.in_flight.pop_front() {
            let entry = handle
                .join()
                .map_err(|_| Error::InvalidInput("a shard-building thread panicked".into()))??;
            self.done.push(entry);
        }
        Ok(())
    }

    /// Writes the last shard and the manifest, then publishes the directory atomically.
    pub fn finish(mut self) -> Result<Manifest> {
        self.flush()?;
        while !self.in_flight.is_empty() {
            self.join_oldest()?;
        }
        if self.done.is_empty() {
            return Err(Error::InvalidInput("no documents were added: refusing to build an empty datastore".into()));
        }
        let manifest = Manifest {
            format_version: FORMAT_VERSION,
            vocab_size: self.opts.vocab_size,
            token_width: token_width_for(self.opts.vocab_size),
            tokenizer_name: self.opts.tokenizer_name.clone(),
            tokenizer_fingerprint: self.opts.tokenizer_fingerprint.clone(),
            n_tokens: self.done.iter().map(|s| s.n_tokens).sum(),
            n_docs: self.done.iter().map(|s| s.n_docs).sum(),
            shards: self.done.clone(),
        };
        let manifest_path = self.tmp_dir.join(MANIFEST_NAME);
        write_synced(&manifest_path, manifest.to_json().as_bytes())?;
        // The lock file goes before publishing (the flock stays ours until `self` is dropped).
        let lock_path = self.tmp_dir.join(LOCK_NAME);
        fs::remove_file(&lock_path).map_err(|e| Error::io(&lock_path, e))?;
        sync_dir(&self.tmp_dir)?;
        self.publish()?;
        self.finished = true;
        Ok(manifest)
    }

    /// Puts the finished temporary directory at `out_dir`, replacing what is there atomically.
    fn publish(&self) -> Result<()> {
        let out = &self.out_dir;
        if out.symlink_metadata().is_err() {
            fs::rename(&self.tmp_dir, out).map_err(|e| Error::io(out, e))?;
        } else {
            check_replaceable(out)?;
            match exchange(&self.tmp_dir, out) {
                Ok(()) => {} // the old datastore is now at tmp_dir
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOSYS) | Some(libc::EXDEV)) => {
                    // No exchange on this file system: rename aside, rename in.
                    let aside = temporary_name(out, &format!("{}.old", std::process::id()));
                    fs::rename(out, &aside).map_err(|e| Error::io(out, e))?;
                    fs::rename(&self.tmp_dir, out).map_err(|e| Error::io(out, e))?;
                    fs::rename(&aside, &self.tmp_dir).map_err(|e| Error::io(&aside, e))?;
                }
                Err(e) => return Err(Error::io(out, e)),
            }
            remove_any(&self.tmp_dir).map_err(|e| Error::io(&self.tmp_dir, e))?;
        }
        if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(parent)?;
        }
        Ok(())
    }
}

/// `<out>.tmp-<suffix>` beside `out`.
fn temporary_name(out: &Path, suffix: &str) -> PathBuf {
    let mut name: OsString = out.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp-{suffix}"));
    out.with_file_name(name)
}

/// Only a datastore (a directory with a manifest), an empty directory or a plain file may be
/// replaced: `overwrite` must never delete a directory of other things given by mistake.
fn check_replaceable(out: &Path) -> Result<()> {
    let meta = out.symlink_metadata().map_err(|e| Error::io(out, e))?;
    if !meta.is_dir() {
        return Ok(());
    }
    let is_datastore = out.join(MANIFEST_NAME).is_file();
    let is_empty = fs::read_dir(out).map_err(|e| Error::io(out, e))?.next().is_none();
    if is_datastore || is_empty {
        Ok(())
    } else {
        Err(Error::InvalidInput(format!(
            "{} is a directory but not a datastore (no {MANIFEST_NAME}); refusing to replace it",
            out.display()
        )))
    }
}

/// Removes the `<out>.tmp-*` entries of builds that are gone: a directory whose lock file can
/// be locked (its builder is dead), or, with no lock file (a build killed before it made one,
/// or between publishing and cleaning up), whose process id names no running process.
fn remove_dead_temporaries(out: &Path) {
    let Some(name) = out.file_name() else { return };
    let prefix = format!("{}.tmp-", name.to_string_lossy());
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let Ok(entries) = fs::read_dir(parent) else { return };
    for entry in entries.flatten() {
        let file_name = entry.file_name().to_string_lossy().into_owned();
        let Some(suffix) = file_name.strip_prefix(&prefix) else { continue };
        let path = entry.path();
        let dead = match File::open(path.join(LOCK_NAME)) {
            Ok(lock) => try_lock_exclusive(&lock).unwrap_or(false),
            Err(_) => {
                let pid = suffix.split('.').next().and_then(|p| p.parse::<u32>().ok());
                pid.is_some_and(|pid| pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists())
            }
        };
        if dead {
            let _ = remove_any(&path);
        }
    }
}

fn remove_any(path: &Path) -> std::io::Result<()> {
    if path.symlink_metadata()?.is_dir() {
        fs::remove_dir_all(path)
    } else {
        fs::remove_file(path)
    }
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| Error::io(dir, e))
}

impl Drop for Builder {
    fn drop(&mut self) {
        if !self.finished {
            for handle in self.in_flight.drain(..) {
                let _ = handle.join();
            }
            let _ = fs::remove_dir_all(&self.tmp_dir);
        }
    }
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut file = File::create(path).map_err(|e| Error::io(path, e))?;
    file.write_all(bytes).map_err(|e| Error::io(path, e))?;
    file.sync_all().map_err(|e| Error::io(path, e))
}

/// The suffix array of `tokens` (separators sort after every token id), by libsais.
pub fn suffix_array(tokens: &[u32], vocab_size: u32) -> Result<Vec<i32>> {
    let n = tokens.len();
    if n as u64 > MAX_SHARD_TOKENS {
        return Err(Error::InvalidInput(format!("{n} tokens is too many for one shard")));
    }
    let mut sa = vec![0i32; n];
    let status = if token_width_for(vocab_size) == 2 {
        let text: Vec<u16> = tokens.iter().map(|&t| t as u16).collect();
        // SAFETY: `text` and `sa` both hold `n` elements, no extra space (fs = 0) and no
        // frequency table (null) are passed, as libsais16 documents.
        unsafe { libsais_sys::libsais16::libsais16(text.as_ptr(), sa.as_mut_ptr(), n as i32, 0, std::ptr::null_mut()) }
    } else {
        // libsais_int wants symbols in [0, k): the separator becomes `vocab_size`, still the largest.
        let mut text: Vec<i32> =
            tokens.iter().map(|&t| if t == u32::MAX { vocab_size as i32 } else { t as i32 }).collect();
        if vocab_size as u64 + 1 > i32::MAX as u64 {
            return Err(Error::InvalidInput(format!("vocabulary size {vocab_size} is too large")));
        }
        // SAFETY: `text` and `sa` both hold `n` elements, every symbol is in [0, vocab_size], and
        // k = vocab_size + 1; libsais_int restores `text` before returning.
        unsafe { libsais_sys::libsais::libsais_int(text.as_mut_ptr(), sa.as_mut_ptr(), n as i32, vocab_size as i32 + 1, 0) }
    };
    if status != 0 {
        return Err(Error::InvalidInput(format!("suffix array construction failed (libsais status {status})")));
    }
    Ok(sa)
}

fn write_shard(path: &Path, name: &str, tokens: Vec<u32>, n_docs: u64, opts: &BuildOptions) -> Result<ShardEntry> {
    let sa = suffix_array(&tokens, opts.vocab_size)?;
    let width = token_width_for(opts.vocab_size);
    let token_bytes: Vec<u8> = if width == 2 {
        let narrow: Vec<u16> = tokens.iter().map(|&t| t as u16).collect();
        bytes_of(&narrow).to_vec()
    } else {
        bytes_of(&tokens).to_vec()
    };
    drop(tokens);
    let sa_bytes = bytes_of(&sa);
    let header = ShardHeader {
        token_width: width,
        vocab_size: opts.vocab_size,
        n_tokens: sa.len() as u64,
        n_docs,
        tokens_checksum: checksum(&token_bytes),
        sa_checksum: checksum(sa_bytes),
        tokenizer_name: opts.tokenizer_name.clone(),
        tokenizer_fingerprint: opts.tokenizer_fingerprint.clone(),
    };
    let io = |e| Error::io(path, e);
    let mut out = BufWriter::with_capacity(1 << 20, File::create(path).map_err(io)?);
    out.write_all(&[0u8; HEADER_LEN]).map_err(io)?; // the header goes last, once complete
    out.write_all(&token_bytes).map_err(io)?;
    let padding = header.sa_offset() - header.tokens_offset() - token_bytes.len() as u64;
    out.write_all(&vec![0u8; padding as usize]).map_err(io)?;
    out.write_all(sa_bytes).map_err(io)?;
    out.seek(SeekFrom::Start(0)).map_err(io)?;
    out.write_all(&header.encode()).map_err(io)?;
    let file = out.into_inner().map_err(|e| io(e.into_error()))?;
    file.sync_all().map_err(io)?;
    Ok(ShardEntry {
        name: name.to_string(),
        file: path.file_name().unwrap().to_string_lossy().into_owned(),
        n_tokens: header.n_tokens,
        n_docs,
        file_len: header.file_len(),
        tokens_checksum: format!("{:016x}", header.tokens_checksum),
        sa_checksum: format!("{:016x}", header.sa_checksum),
    })
}
