//! One shard file: its header, its tokens and its suffix array, memory-mapped.

use crate::error::{Error, Result};
use crate::format::{checksum, separator_for, ShardHeader, HEADER_LEN};
use crate::search_index::{FirstTokens, TokenPairs};
use crate::mmap::{open_regular, view};
use crate::watch::{Events, Watched, Watching};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The token array, whatever its width.
#[derive(Clone, Copy)]
pub enum Text<'a> {
    U16(&'a [u16]),
    U32(&'a [u32]),
}

impl Text<'_> {
    /// The token at `pos`, or `None` past the end.
    #[inline]
    pub fn get(&self, pos: usize) -> Option<u32> {
        match self {
            Text::U16(t) => t.get(pos).map(|&x| x as u32),
            Text::U32(t) => t.get(pos).copied(),
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Text::U16(t) => t.len(),
            Text::U32(t) => t.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

pub struct Shard {
    pub name: String,
    pub path: PathBuf,
    pub header: ShardHeader,
    /// The mapping, under watch: out of service once the file changes (see `watch`).
    file: Arc<Watched>,
    /// First-token intervals, kept for every search (`search_index`).
    first_tokens: FirstTokens,
    /// First-pair intervals, kept for every search (`search_index`).
    token_pairs: TokenPairs,
}

/// A borrowed view of a shard's arrays: what searches work on.
pub struct ShardView<'a> {
    pub path: &'a Path,
    pub text: Text<'a>,
    pub sa: &'a [u32],
    pub separator: u32,
    pub first_tokens: &'a FirstTokens,
    pub token_pairs: &'a TokenPairs,
}

impl Shard {
    /// Validates a shard file's header (sizes, offsets) and maps it; fast: it reads one page.
    /// A FIFO, a device or a directory is refused before anything is read from it.
    pub fn open(name: &str, path: &Path, events: Arc<Events>, watching: Watching) -> Result<Self> {
        Self::open_through(name, path, path, events, watching)
    }

    /// `open` of the file at `open` (a path through a directory handle), known as `path`.
    pub fn open_through(name: &str, open: &Path, path: &Path, events: Arc<Events>, watching: Watching) -> Result<Self> {
        let (file, len) = open_regular(open, path)?;
        let mut head = vec![0u8; HEADER_LEN.min(len as usize)];
        file.read_exact_at(&mut head, 0).map_err(|e| Error::io(path, e))?;
        let header = ShardHeader::decode(path, &head, len)?;
        let file = Watched::new(name, path, open, file, len, events, watching)?;
        let first_tokens = FirstTokens::new(header.vocab_size);
        let token_pairs = TokenPairs::new(header.n_tokens);
        let shard = Shard { name: name.to_string(), path: path.to_path_buf(), header, file, first_tokens, token_pairs };
        shard.view()?; // checks that the sections can be viewed
        Ok(shard)
    }

    pub fn view(&self) -> Result<ShardView<'_>> {
        let h = &self.header;
        let bytes = self.file.map.bytes();
        let text = if h.token_width == 2 {
            Text::U16(view::<u16>(&self.path, bytes, h.tokens_offset(), h.n_tokens)?)
        } else {
            Text::U32(view::<u32>(&self.path, bytes, h.tokens_offset(), h.n_tokens)?)
        };
        let sa = view::<u32>(&self.path, bytes, h.sa_offset(), h.n_tokens)?;
        Ok(ShardView {
            path: &self.path,
            text,
            sa,
            separator: separator_for(h.token_width),
            first_tokens: &self.first_tokens,
            token_pairs: &self.token_pairs,
        })
    }

    /// Whether the shard is in service: its file has not changed since it was mapped.
    pub fn is_serving(&self) -> bool {
        self.file.is_serving()
    }

    /// Why the shard is out of service; None while it serves.
    pub fn out_of_service_reason(&self) -> Option<String> {
        self.file.reason()
    }

    /// Takes the shard out of service (a failed check, for instance); the first reason stays.
    pub fn take_out_of_service(&self, reason: String) {
        self.file.take_out_of_service(reason)
    }

    /// Whether a read lease holds writers back until this shard is out of service.
    pub fn has_lease(&self) -> bool {
        self.file.has_lease()
    }

    /// The mapped file (still open), for reading it without the mapping (the scrub).
    pub fn watched(&self) -> &Watched {
        &self.file
    }

    /// The slow full check: both checksums, then the suffix array's structure (every position
    /// once, consecutive suffixes in order on their first token).
    pub fn verify(&self) -> Result<()> {
        let h = &self.header;
        let tokens_end = (h.tokens_offset() + h.n_tokens * h.token_width as u64) as usize;
        let bytes = self.file.map.bytes();
        if checksum(&bytes[h.tokens_offset() as usize..tokens_end]) != h.tokens_checksum {
            return Err(Error::ChecksumMismatch { path: self.path.clone(), section: "tokens" });
        }
        if checksum(&bytes[h.sa_offset() as usize..]) != h.sa_checksum {
            return Err(Error::ChecksumMismatch { path: self.path.clone(), section: "suffix array" });
        }
        let v = self.view()?;
        let n = v.sa.len();
        let mut seen = vec![false; n];
        let mut previous_first = 0u32;
        for &pos in v.sa {
            let pos = pos as usize;
            if pos >= n || seen[pos] {
                return Err(Error::corrupt(&self.path, "suffix array is not a permutation"));
            }
            seen[pos] = true;
            let first = v.text.get(pos).unwrap();
            if first < previous_first {
                return Err(Error::corrupt(&self.path, "suffix array is not sorted"));
            }
            previous_first = first;
        }
        if n > 0 && v.text.get(n - 1) != Some(v.separator) {
            return Err(Error::corrupt(&self.path, "token array does not end with a separator"));
        }
        Ok(())
    }
}
