//! The suffix-array interval of each first token, found once per token and kept for every search.
//!
//! A pattern's interval lies inside its first token's, which holds `n / vocabulary` suffixes on
//! average: a search that starts from it skips most of the binary search over the whole suffix
//! array (about 22 of 27 halvings at 100M tokens with a 16k vocabulary), the part that pays a
//! cache miss at every step. Intervals are found lazily, on a token's first search, and shared by
//! every thread (a lost race only finds the same interval twice).

use std::sync::atomic::{AtomicU64, Ordering};

/// Vocabularies larger than this get no table (it would cost 8 bytes per token id).
const MAX_TABLE_VOCAB: u32 = 1 << 22;

/// `(lo, hi)` of each first token's interval, packed as `(lo << 32 | hi) + 1`; 0: not found yet.
pub struct FirstTokens {
    slots: Vec<AtomicU64>,
}

impl FirstTokens {
    /// A table for token ids `0..vocab_size` (none for a vocabulary above `MAX_TABLE_VOCAB`).
    pub fn new(vocab_size: u32) -> Self {
        let n = if vocab_size <= MAX_TABLE_VOCAB { vocab_size as usize } else { 0 };
        FirstTokens { slots: (0..n).map(|_| AtomicU64::new(0)).collect() }
    }

    /// The interval of `token`, from the table or found by `find` (and kept).
    #[inline]
    pub fn get(&self, token: u32, find: impl FnOnce() -> (u32, u32)) -> (u32, u32) {
        let Some(slot) = self.slots.get(token as usize) else { return find() };
        if let Some(interval) = unpack(slot.load(Ordering::Relaxed)) {
            return interval;
        }
        let (lo, hi) = find();
        if lo != u32::MAX {
            slot.store(pack(lo, hi), Ordering::Relaxed);
        }
        (lo, hi)
    }
}

/// An interval `(lo, hi)` as one word, `(lo << 32 | hi) + 1`, so that 0 can mean "none".
#[inline]
fn pack(lo: u32, hi: u32) -> u64 {
    (((lo as u64) << 32) | hi as u64) + 1
}

/// `pack`'s interval, or None for 0.
#[inline]
fn unpack(packed: u64) -> Option<(u32, u32)> {
    let value = packed.checked_sub(1)?;
    Some(((value >> 32) as u32, value as u32))
}

/// Probes of one key before `TokenPairs` gives up on keeping it (its neighbourhood is full).
const PAIR_PROBES: usize = 8;
/// `TokenPairs` slots: about one per `PAIR_TOKENS_PER_SLOT` tokens of the shard, a power of two
/// in `MIN_PAIR_SLOTS..=MAX_PAIR_SLOTS` (16 bytes each: at most 32 MiB, mapped lazily: a slot's
/// page is only made resident once a pair lands on it).
const PAIR_TOKENS_PER_SLOT: u64 = 32;
const MIN_PAIR_SLOTS: usize = 1 << 10;
const MAX_PAIR_SLOTS: usize = 1 << 21;

/// The suffix-array interval of each first token pair, found once per pair (inside its first
/// token's interval) and kept for every search, in a fixed-size table shared by every thread.
///
/// A pattern's interval lies inside its first pair's: a search that starts there skips the
/// binary search inside the first token's interval (15-20 halvings over the suffix array at 100M
/// tokens, each a cache miss), and a two-token pattern (a longest-match search's first probe, at
/// the default `min_span`) needs no search at all. Memory is bounded: a pair whose neighbourhood
/// of the table is full is searched every time, with the same answer. Each slot is written once
/// (its key, then its interval); a reader that finds the key before the interval searches itself.
pub struct TokenPairs {
    /// `[key, value]` per slot: key `(first << 32 | second) + 1`, value `(lo << 32 | hi) + 1`;
    /// 0: empty (key) or not written yet (value).
    slots: Box<[[AtomicU64; 2]]>,
    mask: usize,
}

impl TokenPairs {
    /// A table sized for a shard of `n_tokens` tokens.
    pub fn new(n_tokens: u64) -> Self {
        let want = (n_tokens / PAIR_TOKENS_PER_SLOT).clamp(MIN_PAIR_SLOTS as u64, MAX_PAIR_SLOTS as u64);
        Self::with_slots((want as usize).next_power_of_two().min(MAX_PAIR_SLOTS))
    }

    /// A table of `slots` slots (a power of two), zeroed by the allocator (pages stay unmapped
    /// until written).
    pub fn with_slots(slots: usize) -> Self {
        assert!(slots.is_power_of_two());
        const _: () = assert!(std::mem::size_of::<[AtomicU64; 2]>() == 16);
        const _: () = assert!(std::mem::align_of::<[AtomicU64; 2]>() == std::mem::align_of::<[u64; 2]>());
        let zeroed = std::mem::ManuallyDrop::new(vec![[0u64; 2]; slots].into_boxed_slice());
        let ptr = zeroed.as_ptr() as *mut [AtomicU64; 2];
        // SAFETY: `[AtomicU64; 2]` has the size, alignment (checked above) and bit validity of
        // `[u64; 2]`; the allocation is moved, not copied, and freed as the new type's.
        let slots_box = unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(ptr, slots)) };
        TokenPairs { slots: slots_box, mask: slots - 1 }
    }

    /// The interval of the pair `(first, second)`, from the table or found by `find` (and kept
    /// when there is room).
    #[inline]
    pub fn get(&self, first: u32, second: u32, find: impl FnOnce() -> (u32, u32)) -> (u32, u32) {
        let key = (((first as u64) << 32) | second as u64).wrapping_add(1);
        if key == 0 {
            return find();
        }
        let home = (key.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as usize;
        for probe in 0..PAIR_PROBES {
            let slot = &self.slots[(home + probe) & self.mask];
            let mut have = slot[0].load(Ordering::Acquire);
            if have == 0 {
                let (lo, hi) = find();
                match slot[0].compare_exchange(0, key, Ordering::AcqRel, Ordering::Acquire) {
                    Ok(_) => {
                        slot[1].store(pack(lo, hi), Ordering::Release);
                        return (lo, hi);
                    }
                    Err(now) => have = now,
                }
                if have != key {
                    return self.keep_after(home, probe + 1, key, (lo, hi));
                }
                return (lo, hi);
            }
            if have == key {
                // Not written yet: being written by another thread.
                return unpack(slot[1].load(Ordering::Acquire)).unwrap_or_else(find);
            }
        }
        find()
    }

    /// Keeps an interval already found in the first free slot from `from` on (a race took the
    /// one it was meant for).
    #[cold]
    fn keep_after(&self, home: usize, from: usize, key: u64, (lo, hi): (u32, u32)) -> (u32, u32) {
        for probe in from..PAIR_PROBES {
            let slot = &self.slots[(home + probe) & self.mask];
            match slot[0].compare_exchange(0, key, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => {
                    slot[1].store(pack(lo, hi), Ordering::Release);
                    break;
                }
                Err(now) if now == key => break,
                Err(_) => continue,
            }
        }
        (lo, hi)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_keep_what_was_found_and_search_again_when_full() {
        let pairs = TokenPairs::with_slots(1 << 10);
        assert_eq!(pairs.get(3, 4, || (10, 20)), (10, 20));
        assert_eq!(pairs.get(3, 4, || panic!("kept")), (10, 20));
        assert_eq!(pairs.get(4, 3, || (5, 5)), (5, 5));
        assert_eq!(pairs.get(4, 3, || panic!("kept")), (5, 5));
        assert_eq!(pairs.get(u32::MAX, u32::MAX, || (1, 2)), (1, 2));
        // A full table still answers, by searching.
        let small = TokenPairs::with_slots(1);
        assert_eq!(small.get(1, 1, || (0, 1)), (0, 1));
        assert_eq!(small.get(2, 2, || (1, 2)), (1, 2));
        assert_eq!(small.get(2, 2, || (1, 2)), (1, 2));
        assert_eq!(small.get(1, 1, || panic!("kept")), (0, 1));
    }

    #[test]
    fn pairs_shared_by_threads_agree() {
        let pairs = TokenPairs::with_slots(1 << 6);
        std::thread::scope(|s| {
            for t in 0..4u32 {
                let pairs = &pairs;
                s.spawn(move || {
                    for round in 0..2000u32 {
                        let (a, b) = ((round + t) % 97, round % 13);
                        assert_eq!(pairs.get(a, b, || (a, a + b)), (a, a + b));
                    }
                });
            }
        });
    }
}
