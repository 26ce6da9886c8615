//! The one place with `unsafe`: mapping shard files and viewing their sections as integer slices.

use crate::error::{Error, Result};
use memmap2::Mmap;
use std::fs::File;
use std::path::Path;

#[cfg(target_endian = "big")]
compile_error!("datastore files are little-endian; big-endian targets are not supported");

/// Maps `path` read-only.
///
/// # Safety (of the mapping)
/// The datastore files are written once, to a temporary directory that is renamed into place
/// only when complete, and are never modified afterwards. Truncating or rewriting a mapped file
/// from another process is outside the contract (as for every memory-mapped reader).
pub fn map_file(path: &Path) -> Result<Mmap> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: see the function's documentation: shard files are immutable once published.
    let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    #[cfg(unix)]
    {
        // Searches jump around the suffix array: read-ahead would only waste page cache.
        let _ = map.advise(memmap2::Advice::Random);
    }
    Ok(map)
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
