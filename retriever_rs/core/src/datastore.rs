//! A datastore directory: the manifest and its shards, opened together and searched as one.

use crate::cancel::Cancel;
use crate::error::{Error, Result};
use crate::format::{Manifest, FORMAT_VERSION, MANIFEST_NAME};
use crate::rest_policy::rest_tree_until;
use crate::search::{with_scratch, Limits, Searcher, Tree, MAX_BUDGET, MAX_DEPTH};
use crate::shard::{Shard, ShardView};
use crate::watch::{Events, ShardChange, Watching};
use rayon::prelude::*;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
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

/// How `Datastore::open_with` opens a datastore.
#[derive(Clone, Debug, Default)]
pub struct OpenOptions {
    /// Only these shards (by name); None: every shard of the manifest.
    pub only: Option<Vec<String>>,
    /// How shard files are watched for changes.
    pub watching: Watching,
    /// A shard that cannot be opened is kept out of service (with the reason) instead of
    /// failing the whole open; the open still fails when no shard can be opened.
    pub tolerate_bad_shards: bool,
}

/// A finished search: its tree and the shards it covered (indexes into `Datastore::shards`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found {
    pub tree: Tree,
    pub searched: Vec<usize>,
}

/// A finished search of back-off levels (`Datastore::search_levels`): its trees and the shards
/// it covered (indexes into `Datastore::shards`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FoundLevels {
    pub trees: Vec<Tree>,
    pub searched: Vec<usize>,
}

pub struct Datastore {
    pub dir: PathBuf,
    pub manifest: Manifest,
    /// The shards that were opened, in manifest order.
    pub shards: Vec<Shard>,
    /// Shards of the manifest that could not be opened (`tolerate_bad_shards`): name, reason.
    pub refused: Vec<(String, String)>,
    events: Arc<Events>,
}

impl Datastore {
    /// Opens the datastore at `dir`: reads the manifest, maps every shard (or only `only`) and
    /// checks each header against the manifest. Reads a few pages; the data stays on disk.
    pub fn open(dir: &Path, only: Option<&[String]>) -> Result<Self> {
        Self::open_with(dir, &OpenOptions { only: only.map(<[String]>::to_vec), ..OpenOptions::default() })
    }

    /// `open` with options. A build may swap the directory for a new one while it is opened
    /// (`Builder` with `overwrite`): everything is read through one handle on the directory, and
    /// an open that failed while the path stopped naming that directory starts again.
    pub fn open_with(dir: &Path, options: &OpenOptions) -> Result<Self> {
        let mut attempts = 0;
        loop {
            let handle = File::open(dir).map_err(|e| Error::io(dir.join(MANIFEST_NAME), e))?;
            let through = PathBuf::from(format!("/proc/self/fd/{}", handle.as_raw_fd()));
            let through = if through.is_dir() { through } else { dir.to_path_buf() };
            match Self::open_through(&through, dir, options) {
                Err(_) if attempts < 3 && !still_at(&handle, dir) => attempts += 1,
                result => return result,
            }
        }
    }

    fn open_through(through: &Path, dir: &Path, options: &OpenOptions) -> Result<Self> {
        let manifest = Manifest::read_through(through, dir)?;
        let only = options.only.as_deref();
        if let Some(names) = only {
            for name in names {
                if !manifest.shards.iter().any(|s| &s.name == name) {
                    return Err(Error::UnknownShard(name.clone()));
                }
            }
        }
        let events = Events::new().map_err(|e| Error::io(dir, e))?;
        let mut shards = Vec::new();
        let mut refused = Vec::new();
        for entry in &manifest.shards {
            if only.is_some_and(|names| !names.contains(&entry.name)) {
                continue;
            }
            let path = dir.join(&entry.file);
            let opened = Shard::open_through(&entry.name, &through.join(&entry.file), &path, events.clone(), options.watching)
                .and_then(|shard| manifest.check_shard(entry, &shard.header, &path).map(|()| shard));
            match opened {
                Ok(shard) => shards.push(shard),
                Err(err) if options.tolerate_bad_shards => refused.push((entry.name.clone(), err.to_string())),
                Err(err) => return Err(err),
            }
        }
        if shards.is_empty() {
            let reasons: Vec<String> = refused.iter().map(|(_, reason)| reason.clone()).collect();
            return Err(Error::NoShardInService(reasons.join("; ")));
        }
        let datastore = Datastore { dir: dir.to_path_buf(), manifest, shards, refused, events };
        for change in datastore.refused_changes() {
            datastore.events.push(change);
        }
        Ok(datastore)
    }

    /// The changes of this datastore's shards (out of service, with the reason), and the socket
    /// that becomes readable when there are some.
    pub fn events(&self) -> &Events {
        &self.events
    }

    /// Every shard this datastore was opened for, in manifest order, with the reason it is out
    /// of service (None: it serves).
    pub fn shard_states(&self) -> Vec<(String, Option<String>)> {
        self.manifest
            .shards
            .iter()
            .filter_map(|entry| {
                if let Some(shard) = self.shards.iter().find(|s| s.name == entry.name) {
                    Some((shard.name.clone(), shard.out_of_service_reason()))
                } else {
                    let refused = self.refused.iter().find(|(name, _)| name == &entry.name)?;
                    Some((refused.0.clone(), Some(refused.1.clone())))
                }
            })
            .collect()
    }

    /// Takes the named shard out of service (a failed check, for instance).
    pub fn take_out_of_service(&self, name: &str, reason: String) -> Result<()> {
        let shard = self.shards.iter().find(|s| s.name == name).ok_or_else(|| Error::UnknownShard(name.into()))?;
        shard.take_out_of_service(reason);
        Ok(())
    }

    /// The refused shards as changes (the first `events().take()` returns them too).
    pub fn refused_changes(&self) -> Vec<ShardChange> {
        self.refused
            .iter()
            .map(|(name, reason)| ShardChange {
                shard: name.clone(),
                path: self
                    .manifest
                    .shards
                    .iter()
                    .find(|s| &s.name == name)
                    .map(|s| self.dir.join(&s.file))
                    .unwrap_or_default(),
                serving: false,
                reason: reason.clone(),
            })
            .collect()
    }

    pub fn format_version(&self) -> u32 {
        FORMAT_VERSION
    }

    /// The shards this datastore was opened for, in or out of service, in manifest order.
    pub fn shard_names(&self) -> Vec<String> {
        self.shard_states().into_iter().map(|(name, _)| name).collect()
    }

    /// Tokens (separators included) in the open shards.
    pub fn n_tokens(&self) -> u64 {
        self.shards.iter().map(|s| s.header.n_tokens).sum()
    }

    pub fn n_docs(&self) -> u64 {
        self.shards.iter().map(|s| s.header.n_docs).sum()
    }

    /// The shards a search uses: the named ones, which must be in service, or every shard in
    /// service. Indexes into `self.shards`.
    fn searchable(&self, only: Option<&[String]>) -> Result<Vec<usize>> {
        if let Some(names) = only {
            if names.is_empty() {
                return Err(Error::InvalidQuery("no shard named: leave the shards out to search every shard".into()));
            }
            let mut picked = Vec::with_capacity(names.len());
            for name in names {
                let Some(i) = self.shards.iter().position(|s| &s.name == name) else {
                    return Err(match self.refused.iter().find(|(n, _)| n == name) {
                        Some((_, reason)) => Error::ShardUnavailable { shard: name.clone(), reason: reason.clone() },
                        None => Error::UnknownShard(name.clone()),
                    });
                };
                if let Some(reason) = self.shards[i].out_of_service_reason() {
                    return Err(Error::ShardUnavailable { shard: name.clone(), reason });
                }
                picked.push(i);
            }
            // The named shards in datastore order, each once: the order a search without names uses.
            picked.sort_unstable();
            picked.dedup();
            return Ok(picked);
        }
        let picked: Vec<usize> = (0..self.shards.len()).filter(|&i| self.shards[i].is_serving()).collect();
        if picked.is_empty() {
            let states = self.shard_states();
            let reasons: Vec<String> =
                states.into_iter().filter_map(|(name, reason)| reason.map(|r| format!("{name}: {r}"))).collect();
            return Err(Error::NoShardInService(reasons.join("; ")));
        }
        Ok(picked)
    }

    /// Runs `search` on the shards in service among `only` and reports which it covered.
    ///
    /// A shard that goes out of service during the search (its file changed: the search then
    /// read zeros from it) makes the answer unusable: a search that named it fails with
    /// `ShardUnavailable`, and one over every shard is run again over those still in service.
    /// `search` is given the views and the shards they are of (indexes into `self.shards`).
    pub fn covering<R>(
        &self,
        only: Option<&[String]>,
        mut search: impl FnMut(&[ShardView], &[usize]) -> Option<R>,
    ) -> Result<Option<(R, Vec<usize>)>> {
        loop {
            let picked = self.searchable(only)?;
            let views = picked.iter().map(|&i| self.shards[i].view()).collect::<Result<Vec<_>>>()?;
            let result = search(&views, &picked);
            drop(views);
            match picked.iter().find(|&&i| !self.shards[i].is_serving()) {
                None => return Ok(result.map(|r| (r, picked))),
                Some(&i) if only.is_some() => {
                    let shard = &self.shards[i];
                    let reason = shard.out_of_service_reason().unwrap_or_default();
                    return Err(Error::ShardUnavailable { shard: shard.name.clone(), reason });
                }
                Some(_) => continue, // at most once per shard: each retry has one fewer
            }
        }
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
        if q.max_depth == 0 || q.max_depth > MAX_DEPTH {
            return Err(Error::InvalidQuery(format!("max_depth must be in 1..={MAX_DEPTH}, got {}", q.max_depth)));
        }
        if q.budget > MAX_BUDGET {
            return Err(Error::InvalidQuery(format!("budget must be <= {MAX_BUDGET}, got {}", q.budget)));
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

    /// `search`, given up (`Ok(None)`) when it is still running at `stop_at`. Lets a caller
    /// try a search in a short time slice before handing it to another thread.
    pub fn search_until(
        &self,
        context: &[i64],
        q: &Query,
        only: Option<&[String]>,
        stop_at: Option<Instant>,
    ) -> Result<Option<Tree>> {
        Ok(self.search_cancellable(context, q, only, &Cancel::at(stop_at))?.map(|found| found.tree))
    }

    /// The search, given up (`Ok(None)`) once `cancel` says so, with the shards it covered.
    pub fn search_cancellable(
        &self,
        context: &[i64],
        q: &Query,
        only: Option<&[String]>,
        cancel: &Cancel,
    ) -> Result<Option<Found>> {
        let found = self.search_levels_cancellable(context, q, 1, only, cancel)?;
        Ok(found.map(|mut f| Found { tree: f.trees.swap_remove(0), searched: f.searched }))
    }

    /// The back-off levels of `context`: the tree of the longest matching suffix (as `search`),
    /// then the trees of the suffixes one token shorter each, while they are at least
    /// `min_span` tokens long; at most `levels` trees, and always the first (which has
    /// `match_length` 0 when nothing matched). Level `k` is `search` with `max_span` set to its
    /// match length, `m - k + 1` for the longest match `m`.
    pub fn search_levels(&self, context: &[i64], q: &Query, levels: usize, only: Option<&[String]>) -> Result<Vec<Tree>> {
        let found = self.search_levels_cancellable(context, q, levels, only, &Cancel::never())?;
        Ok(found.expect("a search that cannot be cancelled always finishes").trees)
    }

    /// `search_levels`, given up (`Ok(None)`) once `cancel` says so, with the shards it covered.
    pub fn search_levels_cancellable(
        &self,
        context: &[i64],
        q: &Query,
        levels: usize,
        only: Option<&[String]>,
        cancel: &Cancel,
    ) -> Result<Option<FoundLevels>> {
        with_scratch(|searcher| self.search_with(searcher, context, q, levels, only, cancel))
    }

    /// The searches of `search_levels_cancellable`, on `searcher` (a session's remembers what
    /// its last search found; see `crate::session`).
    pub(crate) fn search_with(
        &self,
        searcher: &mut Searcher,
        context: &[i64],
        q: &Query,
        levels: usize,
        only: Option<&[String]>,
        cancel: &Cancel,
    ) -> Result<Option<FoundLevels>> {
        let context = self.validate(context, q)?;
        // Only the last `max_span` tokens can matter.
        let tail = &context[context.len().saturating_sub(q.max_span)..];
        let limits = Limits { min_span: q.min_span, max_span: q.max_span, budget: q.budget, max_depth: q.max_depth };
        let found = self.covering(only, |views, picked| {
            // What a session's searcher remembers holds for these mappings of these contents only.
            searcher.bind(picked.iter().zip(views).map(|(&i, v)| {
                let h = &self.shards[i].header;
                [v.sa.as_ptr() as u64, v.sa.len() as u64, h.tokens_checksum, h.sa_checksum]
            }));
            // A search given up halfway leaves its work to the searcher, for the same search
            // asked again (`Searcher::exact_levels`); one over other shards forgets it (`bind`).
            match q.policy {
                Policy::Exact => searcher.exact_levels(views, tail, &limits, levels, cancel),
                Policy::Rest => rest_levels(views, tail, &limits, levels, cancel),
            }
        })?;
        Ok(found.map(|(mut trees, searched)| {
            for tree in &mut trees {
                drop_foreign_tokens(tree, self.manifest.vocab_size);
            }
            FoundLevels { trees, searched }
        }))
    }

    /// The names of `found.searched` shards, in search order.
    pub fn shard_names_of(&self, searched: &[usize]) -> Vec<String> {
        searched.iter().map(|&i| self.shards[i].name.clone()).collect()
    }

    /// Many searches in parallel (rayon).
    pub fn search_batch(&self, contexts: &[Vec<i64>], q: &Query, only: Option<&[String]>) -> Result<Vec<Found>> {
        let never = Cancel::never();
        contexts
            .par_iter()
            .map(|c| Ok(self.search_cancellable(c, q, only, &never)?.expect("never cancelled")))
            .collect()
    }

    /// The slow full check of every open shard: checksums and suffix-array structure.
    pub fn verify(&self) -> Result<()> {
        self.shards.par_iter().map(Shard::verify).collect()
    }

    /// `verify`, shard by shard: the shards that fail, with the error. Does not change their
    /// state (see `take_out_of_service`).
    pub fn verify_each(&self) -> Vec<(String, Error)> {
        self.shards
            .par_iter()
            .filter_map(|shard| shard.verify().err().map(|err| (shard.name.clone(), err)))
            .collect()
    }
}

/// A shard whose bytes changed in place (found by `verify` or the scrub) can hold ids outside
/// the vocabulary; they never reach a caller, whose model could not take them: such a node and
/// its subtree are dropped.
fn drop_foreign_tokens(tree: &mut Tree, vocab_size: u32) {
    if tree.tokens.iter().all(|&t| t < vocab_size) {
        return;
    }
    let mut new_index = vec![-1i32; tree.tokens.len()];
    let (mut tokens, mut parents, mut counts) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..tree.tokens.len() {
        let parent = tree.parents[i];
        let new_parent = if parent < 0 { -1 } else { new_index.get(parent as usize).copied().unwrap_or(-1) };
        if tree.tokens[i] < vocab_size && (parent < 0 || new_parent >= 0) {
            new_index[i] = tokens.len() as i32;
            tokens.push(tree.tokens[i]);
            parents.push(new_parent);
            counts.push(tree.counts[i]);
        }
    }
    (tree.tokens, tree.parents, tree.counts) = (tokens, parents, counts);
}

/// The REST policy's back-off levels: each level searched again with `max_span` one shorter than
/// the last match (the REST policy has no cheaper way).
fn rest_levels(views: &[ShardView], context: &[u32], limits: &Limits, levels: usize, cancel: &Cancel) -> Option<Vec<Tree>> {
    let mut trees = vec![rest_tree_until(views, context, limits, cancel)?];
    while trees.len() < levels {
        let span = trees[trees.len() - 1].match_length as usize;
        if span <= limits.min_span {
            break;
        }
        let level = Limits { max_span: span - 1, ..*limits };
        trees.push(rest_tree_until(views, &context[context.len() - (span - 1)..], &level, cancel)?);
    }
    Some(trees)
}

/// Whether `dir` still names the directory `handle` was opened on.
fn still_at(handle: &File, dir: &Path) -> bool {
    match (handle.metadata(), std::fs::metadata(dir)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}
