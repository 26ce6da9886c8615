//! Datastore format v1 (documented in docs/DATASTORE_FORMAT.md).
//!
//! A datastore is a directory holding `manifest.json` and one or more shard files. A shard file is
//! a 512-byte little-endian header, the token array (2 or 4 bytes per token, every document
//! followed by the separator `SEP`), zero padding to a multiple of 8, and the suffix array
//! (one u32 per token position).

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

pub const MAGIC: [u8; 8] = *b"RESTSHD\x01";
pub const FORMAT_VERSION: u32 = 1;
pub const HEADER_LEN: usize = 512;
pub const MANIFEST_NAME: &str = "manifest.json";
/// The largest manifest read (a manifest takes about 300 bytes per shard).
pub const MAX_MANIFEST_BYTES: u64 = 16 << 20;
/// Largest vocabulary stored with 2-byte tokens: ids 0..=65534, 0xFFFF is the separator.
pub const MAX_VOCAB_U16: u32 = 65_535;
/// Largest vocabulary with 4-byte tokens: the separator 0xFFFF_FFFF must stay out of range.
pub const MAX_VOCAB_U32: u32 = u32::MAX;
/// Shards are built with 32-bit suffix-array construction, so a shard holds fewer than 2^31 tokens.
pub const MAX_SHARD_TOKENS: u64 = (i32::MAX as u64) - 1;

const NAME_LEN: usize = 128;
const FINGERPRINT_LEN: usize = 64;
const CHECKSUM_AT: usize = HEADER_LEN - 8;

/// Token width chosen from the vocabulary size.
pub fn token_width_for(vocab_size: u32) -> u32 {
    if vocab_size <= MAX_VOCAB_U16 {
        2
    } else {
        4
    }
}

/// The separator written after every document: the largest value of the token width.
pub fn separator_for(width: u32) -> u32 {
    if width == 2 {
        u16::MAX as u32
    } else {
        u32::MAX
    }
}

pub fn checksum(bytes: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(bytes)
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardHeader {
    pub token_width: u32,
    pub vocab_size: u32,
    /// Token positions, separators included.
    pub n_tokens: u64,
    pub n_docs: u64,
    pub tokens_checksum: u64,
    pub sa_checksum: u64,
    pub tokenizer_name: String,
    pub tokenizer_fingerprint: String,
}

impl ShardHeader {
    pub fn tokens_offset(&self) -> u64 {
        HEADER_LEN as u64
    }

    pub fn sa_offset(&self) -> u64 {
        let end = self.tokens_offset() + self.n_tokens * self.token_width as u64;
        end.div_ceil(8) * 8
    }

    pub fn file_len(&self) -> u64 {
        self.sa_offset() + self.n_tokens * 4
    }

    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut buf = [0u8; HEADER_LEN];
        buf[0..8].copy_from_slice(&MAGIC);
        buf[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        buf[12..16].copy_from_slice(&self.token_width.to_le_bytes());
        buf[16..20].copy_from_slice(&self.vocab_size.to_le_bytes());
        buf[24..32].copy_from_slice(&self.n_tokens.to_le_bytes());
        buf[32..40].copy_from_slice(&self.n_docs.to_le_bytes());
        buf[40..48].copy_from_slice(&self.tokens_offset().to_le_bytes());
        buf[48..56].copy_from_slice(&self.sa_offset().to_le_bytes());
        buf[56..64].copy_from_slice(&self.tokens_checksum.to_le_bytes());
        buf[64..72].copy_from_slice(&self.sa_checksum.to_le_bytes());
        put_str(&mut buf[72..72 + NAME_LEN], &self.tokenizer_name);
        put_str(&mut buf[200..200 + FINGERPRINT_LEN], &self.tokenizer_fingerprint);
        let sum = checksum(&buf[..CHECKSUM_AT]);
        buf[CHECKSUM_AT..].copy_from_slice(&sum.to_le_bytes());
        buf
    }

    /// Parses and validates a header; `file_len` is the actual size of the file.
    pub fn decode(path: &Path, bytes: &[u8], file_len: u64) -> Result<Self> {
        if bytes.len() < HEADER_LEN {
            return Err(Error::Truncated {
                path: path.into(),
                expected: HEADER_LEN as u64,
                actual: file_len,
            });
        }
        if bytes[0..8] != MAGIC {
            return Err(Error::BadMagic { path: path.into() });
        }
        let version = u32_at(bytes, 8);
        if version != FORMAT_VERSION {
            return Err(Error::UnsupportedVersion {
                path: path.into(),
                found: version,
                supported: FORMAT_VERSION,
            });
        }
        if checksum(&bytes[..CHECKSUM_AT]) != u64_at(bytes, CHECKSUM_AT) {
            return Err(Error::ChecksumMismatch { path: path.into(), section: "header" });
        }
        let header = ShardHeader {
            token_width: u32_at(bytes, 12),
            vocab_size: u32_at(bytes, 16),
            n_tokens: u64_at(bytes, 24),
            n_docs: u64_at(bytes, 32),
            tokens_checksum: u64_at(bytes, 56),
            sa_checksum: u64_at(bytes, 64),
            tokenizer_name: get_str(path, &bytes[72..72 + NAME_LEN])?,
            tokenizer_fingerprint: get_str(path, &bytes[200..200 + FINGERPRINT_LEN])?,
        };
        if header.token_width != token_width_for(header.vocab_size) || header.vocab_size == 0 {
            return Err(Error::corrupt(
                path,
                format!(
                    "token width {} does not fit vocabulary size {}",
                    header.token_width, header.vocab_size
                ),
            ));
        }
        if header.n_tokens > MAX_SHARD_TOKENS || header.n_docs > header.n_tokens {
            return Err(Error::corrupt(
                path,
                format!("impossible counts: {} tokens, {} documents", header.n_tokens, header.n_docs),
            ));
        }
        if u64_at(bytes, 40) != header.tokens_offset() || u64_at(bytes, 48) != header.sa_offset() {
            return Err(Error::corrupt(path, "section offsets do not match the token count"));
        }
        if header.file_len() != file_len {
            return Err(Error::Truncated {
                path: path.into(),
                expected: header.file_len(),
                actual: file_len,
            });
        }
        Ok(header)
    }
}

fn put_str(dst: &mut [u8], s: &str) {
    let stored = stored_prefix(s, dst.len());
    dst[..stored.len()].copy_from_slice(stored.as_bytes());
}

/// The part of `s` a header field of `capacity` bytes holds: cut on a char boundary, so that
/// the stored name stays valid UTF-8.
fn stored_prefix(s: &str, capacity: usize) -> &str {
    let mut end = s.len().min(capacity);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn get_str(path: &Path, src: &[u8]) -> Result<String> {
    let end = src.iter().position(|&b| b == 0).unwrap_or(src.len());
    String::from_utf8(src[..end].to_vec())
        .map_err(|_| Error::corrupt(path, "tokenizer name is not UTF-8"))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// `manifest.json`: what the directory holds, checked against each shard header at open.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Manifest {
    pub format_version: u32,
    pub vocab_size: u32,
    pub token_width: u32,
    pub tokenizer_name: String,
    pub tokenizer_fingerprint: String,
    pub n_tokens: u64,
    pub n_docs: u64,
    pub shards: Vec<ShardEntry>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ShardEntry {
    pub name: String,
    pub file: String,
    pub n_tokens: u64,
    pub n_docs: u64,
    pub file_len: u64,
    pub tokens_checksum: String,
    pub sa_checksum: String,
}

impl Manifest {
    /// Reads and checks `dir/manifest.json`: at most `MAX_MANIFEST_BYTES` of a regular file,
    /// a known version, consistent totals and token width, every shard listed once.
    pub fn read(dir: &Path) -> Result<Self> {
        Self::read_through(dir, dir)
    }

    /// `read` through `open_dir`, a path to the same directory as `dir` (a handle's
    /// `/proc/self/fd/N`); errors name `dir`.
    pub fn read_through(open_dir: &Path, dir: &Path) -> Result<Self> {
        let path = dir.join(MANIFEST_NAME);
        let bytes = crate::mmap::read_capped(&open_dir.join(MANIFEST_NAME), &path, MAX_MANIFEST_BYTES)?;
        let manifest: Manifest = serde_json::from_slice(&bytes)
            .map_err(|e| Error::corrupt(&path, format!("unreadable manifest: {e}")))?;
        manifest.check(&path)?;
        Ok(manifest)
    }

    fn check(&self, path: &Path) -> Result<()> {
        let bad = |reason: String| Err(Error::corrupt(path, reason));
        if self.format_version != FORMAT_VERSION {
            return Err(Error::UnsupportedVersion {
                path: path.into(),
                found: self.format_version,
                supported: FORMAT_VERSION,
            });
        }
        if self.shards.is_empty() {
            return bad("manifest lists no shards".into());
        }
        if self.vocab_size == 0 || self.token_width != token_width_for(self.vocab_size) {
            return bad(format!(
                "manifest token width {} does not fit its vocabulary size {}",
                self.token_width, self.vocab_size
            ));
        }
        let mut names = std::collections::HashSet::new();
        let mut files = std::collections::HashSet::new();
        for shard in &self.shards {
            // A shard file name must stay inside the datastore directory.
            if shard.file.is_empty() || shard.file.contains(['/', '\\', '\0']) || shard.file.starts_with('.') {
                return bad(format!("bad shard file name {:?}", shard.file));
            }
            if shard.name.is_empty() || shard.name.chars().any(char::is_control) {
                return bad(format!("bad shard name {:?}", shard.name));
            }
            if !names.insert(shard.name.as_str()) {
                return bad(format!("shard {:?} is listed twice", shard.name));
            }
            if !files.insert(shard.file.as_str()) {
                return bad(format!("shard file {:?} is listed twice", shard.file));
            }
        }
        let n_tokens = self.shards.iter().try_fold(0u64, |sum, s| sum.checked_add(s.n_tokens));
        let n_docs = self.shards.iter().try_fold(0u64, |sum, s| sum.checked_add(s.n_docs));
        if n_tokens != Some(self.n_tokens) || n_docs != Some(self.n_docs) {
            return bad(format!(
                "manifest totals ({} tokens, {} documents) are not the sums over its shards",
                self.n_tokens, self.n_docs
            ));
        }
        Ok(())
    }

    /// Checks one shard's header (read from `path`) against this manifest and its `entry`.
    pub fn check_shard(&self, entry: &ShardEntry, header: &ShardHeader, path: &Path) -> Result<()> {
        let mismatch = |what: &str| Err(Error::corrupt(path, format!("{what} differs from the manifest")));
        if header.vocab_size != self.vocab_size {
            return mismatch("vocabulary size");
        }
        if header.token_width != self.token_width {
            return mismatch("token width");
        }
        if header.n_tokens != entry.n_tokens || header.n_docs != entry.n_docs || header.file_len() != entry.file_len {
            return mismatch("size");
        }
        if header.tokenizer_name != stored_prefix(&self.tokenizer_name, NAME_LEN) {
            return mismatch("tokenizer name");
        }
        if header.tokenizer_fingerprint != stored_prefix(&self.tokenizer_fingerprint, FINGERPRINT_LEN) {
            return mismatch("tokenizer fingerprint");
        }
        if format!("{:016x}", header.tokens_checksum) != entry.tokens_checksum
            || format!("{:016x}", header.sa_checksum) != entry.sa_checksum
        {
            return mismatch("checksum");
        }
        Ok(())
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("manifest serializes")
    }
}
