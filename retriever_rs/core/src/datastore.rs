//! A datastore directory: the manifest and its shards, opened together and searched as one.

use crate::error::{Error, Result};
use crate::format::{Manifest, FORMAT_VERSION};
use crate::rest_policy::rest_tree;
use crate::search::{with_scratch, Limits, Searcher, Tree};
use crate::shard::{Shard, ShardView};
use rayon::prelude::*;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Which drafting policy builds the tree.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    /// Best-first by exact occurrence count over all occurrences.
    Exact,
    /// The original REST policy (see `rest_policy`).
    Rest,
}

impl std::str::FromStr for Policy {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "exact" => Ok(Policy::Exact),
            "rest" => Ok(Policy::Rest),
            other => Err(Error::InvalidQuery(format!("policy must be \"exact\" or \"rest\", got {other:?}"))),
        }
    }
}

/// A search request; `shards` restricts it to some of the open shards (by name).
#[derive(Clone, Debug)]
pub struct Query {
    pub min_span: usize,
    pub max_span: usize,
    pub budget: usize,
    pub max_depth: usize,
    pub policy: Policy,
}

impl Default for Query {
    fn default() -> Self {
        Query { min_span: 2, max_span: 16, budget: 64, max_depth: 10, policy: Policy::Exact }
    }
}

pub struct Datastore {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub shards: Vec<Shard>,
}

impl Datastore {
    /// Opens the datastore at `dir`: reads the manifest, maps every shard (or only `only`) and
    /// checks each header against the manifest. Reads a few pages; the data stays on disk.
    pub fn open(dir: &Path, only: Option<&[String]>) -> Result<Self> {
        let manifest = Manifest::read(dir)?;
        if let Some(names) = only {
            for name in names {
                if !manifest.shards.iter().any(|s| &s.name == name) {
                    return Err(Error::UnknownShard(name.clone()));
                }
            }
        }
        let mut shards = Vec::new();
        for entry in &manifest.shards {
            if only.is_some_and(|names| !names.contains(&entry.name)) {
                continue;
            }
            let path = dir.join(&entry.file);
            let shard = Shard::open(&entry.name, &path)?;
            let h = &shard.header;
            let mismatch = |what: &str| Error::corrupt(&path, format!("{what} differs from the manifest"));
            if h.vocab_size != manifest.vocab_size {
                return Err(mismatch("vocabulary size"));
            }
            if h.n_tokens != entry.n_tokens || h.n_docs != entry.n_docs || h.file_len() != entry.file_len {
                return Err(mismatch("size"));
            }
            if h.tokenizer_fingerprint != manifest.tokenizer_fingerprint {
                return Err(mismatch("tokenizer fingerprint"));
            }
            if format!("{:016x}", h.tokens_checksum) != entry.tokens_checksum
                || format!("{:016x}", h.sa_checksum) != entry.sa_checksum
            {
                return Err(mismatch("checksum"));
            }
            shards.push(shard);
        }
        Ok(Datastore { dir: dir.to_path_buf(), manifest, shards })
    }

    pub fn format_version(&self) -> u32 {
        FORMAT_VERSION
    }

    pub fn shard_names(&self) -> Vec<String> {
        self.shards.iter().map(|s| s.name.clone()).collect()
    }

    /// Tokens (separators included) in the open shards.
    pub fn n_tokens(&self) -> u64 {
        self.shards.iter().map(|s| s.header.n_tokens).sum()
    }

    pub fn n_docs(&self) -> u64 {
        self.shards.iter().map(|s| s.header.n_docs).sum()
    }

    /// The shards a search of `only` (all when `None`) covers, in search order.
    fn selected(&self, only: Option<&[String]>) -> Result<Vec<&Shard>> {
        if let Some(names) = only {
            if let Some(bad) = names.iter().find(|n| !self.shards.iter().any(|s| &&s.name == n)) {
                return Err(Error::UnknownShard(bad.clone()));
            }
        }
        Ok(self.shards.iter().filter(|s| only.is_none_or(|names| names.contains(&s.name))).collect())
    }

    fn validate(&self, context: &[i64], q: &Query) -> Result<Vec<u32>> {
        if context.is_empty() {
            return Err(Error::InvalidQuery("context is empty".into()));
        }
        if q.min_span == 0 || q.max_span < q.min_span {
            return Err(Error::InvalidQuery(format!(
                "need 1 <= min_span <= max_span, got min_span={} max_span={}",
                q.min_span, q.max_span
            )));
        }
        if q.max_depth == 0 {
            return Err(Error::InvalidQuery("max_depth must be >= 1".into()));
        }
        let vocab = self.manifest.vocab_size as i64;
        context
            .iter()
            .enumerate()
            .map(|(i, &t)| {
                if (0..vocab).contains(&t) {
                    Ok(t as u32)
                } else {
                    Err(Error::InvalidQuery(format!(
                        "context token {t} at position {i} is outside the vocabulary [0, {vocab})"
                    )))
                }
            })
            .collect()
    }

    /// The continuation tree for `context` (see `search::exact_tree` and `rest_policy`).
    pub fn search(&self, context: &[i64], q: &Query, only: Option<&[String]>) -> Result<Tree> {
        let tree = self.search_until(context, q, only, None)?;
        Ok(tree.expect("a search without a time limit always finishes"))
    }

    /// `search`, given up (`Ok(None)`) when it is still running at `stop_at`. Only the exact
    /// policy can stop early; a REST-policy search is given up at once when it has a time limit.
    /// Lets a caller try a search in a short time slice before handing it to another thread.
    pub fn search_until(
        &self,
        context: &[i64],
        q: &Query,
        only: Option<&[String]>,
        stop_at: Option<Instant>,
    ) -> Result<Option<Tree>> {
        let levels = self.search_levels_until(context, q, 1, only, stop_at)?;
        Ok(levels.map(|mut trees| trees.swap_remove(0)))
    }

    /// The back-off levels of `context`: the tree of the longest matching suffix (as `search`),
    /// then the trees of the suffixes one token shorter each, while they are at least
    /// `min_span` tokens long; at most `levels` trees, and always the first (which has
    /// `match_length` 0 when nothing matched). Level `k` is `search` with `max_span` set to its
    /// match length, `m - k + 1` for the longest match `m`.
    pub fn search_levels(&self, context: &[i64], q: &Query, levels: usize, only: Option<&[String]>) -> Result<Vec<Tree>> {
        let trees = self.search_levels_until(context, q, levels, only, None)?;
        Ok(trees.expect("a search without a time limit always finishes"))
    }

    /// `search_levels`, given up (`Ok(None)`) when it is still running at `stop_at` (at once for
    /// the REST policy, as `search_until`).
    pub fn search_levels_until(
        &self,
        context: &[i64],
        q: &Query,
        levels: usize,
        only: Option<&[String]>,
        stop_at: Option<Instant>,
    ) -> Result<Option<Vec<Tree>>> {
        with_scratch(|searcher| self.search_with(searcher, context, q, levels, only, stop_at))
    }

    /// The searches of `search_levels_until`, on `searcher` (a session's, which remembers; see
    /// `crate::session`).
    pub(crate) fn search_with(
        &self,
        searcher: &mut Searcher,
        context: &[i64],
        q: &Query,
        levels: usize,
        only: Option<&[String]>,
        stop_at: Option<Instant>,
    ) -> Result<Option<Vec<Tree>>> {
        let context = self.validate(context, q)?;
        let shards = self.selected(only)?;
        let views = shards.iter().map(|s| s.view()).collect::<Result<Vec<_>>>()?;
        // What a session's searcher remembers holds for these mappings of these contents only.
        searcher.bind(shards.iter().zip(&views).map(|(s, v)| {
            [v.sa.as_ptr() as u64, v.sa.len() as u64, s.header.tokens_checksum, s.header.sa_checksum]
        }));
        // Only the last `max_span` tokens can matter.
        let tail = &context[context.len().saturating_sub(q.max_span)..];
        let limits = Limits { min_span: q.min_span, max_span: q.max_span, budget: q.budget, max_depth: q.max_depth };
        Ok(match (q.policy, stop_at) {
            (Policy::Exact, None) => searcher.exact_levels(&views, tail, &limits, levels, &mut || false),
            (Policy::Exact, Some(t)) => searcher.exact_levels(&views, tail, &limits, levels, &mut || Instant::now() >= t),
            (Policy::Rest, None) => Some(rest_levels(&views, tail, &limits, levels)),
            (Policy::Rest, Some(_)) => None,
        })
    }

    /// The names of the shards a search of `only` covers, in search order.
    pub fn searched_shards(&self, only: Option<&[String]>) -> Result<Vec<String>> {
        Ok(self.selected(only)?.into_iter().map(|s| s.name.clone()).collect())
    }

    /// Many searches in parallel (rayon).
    pub fn search_batch(&self, contexts: &[Vec<i64>], q: &Query, only: Option<&[String]>) -> Result<Vec<Tree>> {
        contexts.par_iter().map(|c| self.search(c, q, only)).collect()
    }

    /// The slow full check of every open shard: checksums and suffix-array structure.
    pub fn verify(&self) -> Result<()> {
        self.shards.par_iter().map(Shard::verify).collect()
    }
}

/// The REST policy's back-off levels: each level searched again with `max_span` one shorter than
/// the last match (the REST policy has no cheaper way).
fn rest_levels(views: &[ShardView], context: &[u32], limits: &Limits, levels: usize) -> Vec<Tree> {
    let mut trees = vec![rest_tree(views, context, limits)];
    while trees.len() < levels {
        let span = trees[trees.len() - 1].match_length as usize;
        if span <= limits.min_span {
            break;
        }
        let level = Limits { max_span: span - 1, ..*limits };
        trees.push(rest_tree(views, &context[context.len() - (span - 1)..], &level));
    }
    trees
}
