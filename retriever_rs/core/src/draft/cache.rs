//! A cache of the datastore's answers for short suffixes, shared by a generator's generations.
//!
//! The back-off levels of a step end in short suffixes (one to three tokens: `" ="`,
//! `"\n    "`), which occur everywhere in a datastore and are the costliest to answer (their
//! continuation trees are cut out of huge suffix-array intervals), and the same few recur step
//! after step: on the reference replay 61% of the short back-off searches repeat an earlier one.
//! An answer depends only on the suffix, the query and the datastore, so it is kept.
//!
//! Two generations of entries approximate least-recently-used order: lookups promote an old entry
//! to the young map; when the young map holds half the capacity, it becomes the old one and the
//! previous old entries are forgotten.

use crate::datastore::{Datastore, Policy, Query};
use crate::search::Tree;
use rustc_hash::FxHashMap;
use std::hash::{Hash, Hasher};

/// Suffixes up to this many tokens are cached.
pub const MAX_CACHED_SPAN: usize = 3;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CacheKey {
    datastore: u64,
    budget: usize,
    max_depth: usize,
    min_span: usize,
    rest_policy: bool,
    tokens: [i64; MAX_CACHED_SPAN],
    len: u8,
}

impl CacheKey {
    /// The key of `suffix` (at most `MAX_CACHED_SPAN` tokens, searched with `query` whose
    /// `max_span` is its length) in the datastore of identity `datastore`.
    pub fn new(datastore: u64, query: &Query, suffix: &[i64]) -> Option<Self> {
        if suffix.is_empty() || suffix.len() > MAX_CACHED_SPAN {
            return None;
        }
        let mut tokens = [0i64; MAX_CACHED_SPAN];
        tokens[..suffix.len()].copy_from_slice(suffix);
        Some(CacheKey {
            datastore,
            budget: query.budget,
            max_depth: query.max_depth,
            min_span: query.min_span,
            rest_policy: query.policy == Policy::Rest,
            tokens,
            len: suffix.len() as u8,
        })
    }
}

/// What tells one opened datastore from another: its directory, and its shards' sizes and
/// checksums (a datastore rebuilt in the same place answers differently).
pub fn datastore_identity(datastore: &Datastore) -> u64 {
    let mut hasher = rustc_hash::FxHasher::default();
    datastore.dir.hash(&mut hasher);
    for shard in &datastore.shards {
        shard.name.hash(&mut hasher);
        shard.header.n_tokens.hash(&mut hasher);
        shard.header.tokens_checksum.hash(&mut hasher);
        shard.header.sa_checksum.hash(&mut hasher);
    }
    hasher.finish()
}

#[derive(Debug)]
pub struct LevelCache {
    capacity: usize,
    young: FxHashMap<CacheKey, Tree>,
    old: FxHashMap<CacheKey, Tree>,
    pub hits: u64,
    pub misses: u64,
}

impl LevelCache {
    /// A cache of at most `capacity` answers (a 64-node answer is about 1 KB).
    pub fn new(capacity: usize) -> Self {
        LevelCache { capacity: capacity.max(2), young: FxHashMap::default(), old: FxHashMap::default(), hits: 0, misses: 0 }
    }

    pub fn len(&self) -> usize {
        self.young.len() + self.old.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn get(&mut self, key: &CacheKey) -> Option<Tree> {
        if let Some(tree) = self.young.get(key) {
            self.hits += 1;
            return Some(tree.clone());
        }
        match self.old.remove(key) {
            Some(tree) => {
                self.hits += 1;
                self.insert(*key, tree.clone());
                Some(tree)
            }
            None => {
                self.misses += 1;
                None
            }
        }
    }

    pub fn insert(&mut self, key: CacheKey, tree: Tree) {
        if self.young.len() >= self.capacity / 2 {
            self.old = std::mem::take(&mut self.young);
        }
        self.young.insert(key, tree);
    }

    pub fn clear(&mut self) {
        self.young.clear();
        self.old.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(m: u32) -> Tree {
        Tree { match_length: m, occurrences: 1, ..Tree::default() }
    }

    #[test]
    fn keeps_the_recently_used_within_its_capacity() {
        let q = Query::default();
        let key = |t: i64| CacheKey::new(1, &q, &[t]).unwrap();
        let mut cache = LevelCache::new(4);
        cache.insert(key(1), tree(1));
        cache.insert(key(2), tree(2));
        cache.insert(key(3), tree(3)); // young was full: 1 and 2 are old now
        assert_eq!(cache.get(&key(1)).unwrap().match_length, 1); // promoted
        cache.insert(key(4), tree(4)); // young (3, 1) full: they age, 2 is forgotten
        assert!(cache.get(&key(2)).is_none());
        assert!(cache.get(&key(3)).is_some() && cache.get(&key(1)).is_some());
        assert!(cache.len() <= 4);
    }

    #[test]
    fn keys_tell_suffixes_queries_and_datastores_apart() {
        let q = Query::default();
        let other = Query { budget: 8, ..Query::default() };
        assert_ne!(CacheKey::new(1, &q, &[5]), CacheKey::new(1, &q, &[5, 0]));
        assert_ne!(CacheKey::new(1, &q, &[5]), CacheKey::new(1, &other, &[5]));
        assert_ne!(CacheKey::new(1, &q, &[5]), CacheKey::new(2, &q, &[5]));
        assert!(CacheKey::new(1, &q, &[1, 2, 3, 4]).is_none());
    }
}
