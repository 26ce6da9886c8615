//! One shard file: its header, its tokens and its suffix array, memory-mapped.

use crate::error::{Error, Result};
use crate::format::{checksum, separator_for, ShardHeader, HEADER_LEN};
use crate::mmap::{map_file, view};
use memmap2::Mmap;
use std::path::{Path, PathBuf};

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
    map: Mmap,
}

/// A borrowed view of a shard's arrays: what searches work on.
pub struct ShardView<'a> {
    pub path: &'a Path,
    pub text: Text<'a>,
    pub sa: &'a [u32],
    pub separator: u32,
}

impl Shard {
    /// Maps and validates a shard file (header, sizes, offsets); fast: it reads one page.
    pub fn open(name: &str, path: &Path) -> Result<Self> {
        let map = map_file(path)?;
        let header = ShardHeader::decode(path, &map[..map.len().min(HEADER_LEN)], map.len() as u64)?;
        let shard = Shard { name: name.to_string(), path: path.to_path_buf(), header, map };
        shard.view()?; // checks that the sections can be viewed
        Ok(shard)
    }

    pub fn view(&self) -> Result<ShardView<'_>> {
        let h = &self.header;
        let text = if h.token_width == 2 {
            Text::U16(view::<u16>(&self.path, &self.map, h.tokens_offset(), h.n_tokens)?)
        } else {
            Text::U32(view::<u32>(&self.path, &self.map, h.tokens_offset(), h.n_tokens)?)
        };
        let sa = view::<u32>(&self.path, &self.map, h.sa_offset(), h.n_tokens)?;
        Ok(ShardView { path: &self.path, text, sa, separator: separator_for(h.token_width) })
    }

    /// The slow full check: both checksums, then the suffix array's structure (every position
    /// once, consecutive suffixes in order on their first token).
    pub fn verify(&self) -> Result<()> {
        let h = &self.header;
        let tokens_end = (h.tokens_offset() + h.n_tokens * h.token_width as u64) as usize;
        if checksum(&self.map[h.tokens_offset() as usize..tokens_end]) != h.tokens_checksum {
            return Err(Error::ChecksumMismatch { path: self.path.clone(), section: "tokens" });
        }
        if checksum(&self.map[h.sa_offset() as usize..]) != h.sa_checksum {
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
