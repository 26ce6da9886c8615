//! One generation's drafting: every step's levels from the context, the served outputs and the
//! datastore, and levels given from outside (remote shards, other sources), scored into one tree
//! in one call. The reference is `decoder.draft_sources` with `decoder.draft_tree`: the same
//! levels in the same order (context, served outputs, datastore, then the given ones), the same
//! scorer.

use super::cache::{datastore_identity, CacheKey, LevelCache};
use super::ngram::{NgramIndex, ServedOutputs};
use super::score::{DraftTree, Level, LevelCounts, ScoreError, Scorer};
use crate::cancel::Cancel;
use crate::datastore::{Datastore, Policy, Query};
use crate::search::Tree;
use crate::session::SearchSession;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How an n-gram source drafts (`decoder.config.NgramParams`): for every n from `max_ngram` down
/// to `min_ngram` whose n-gram (the context's last n tokens) occurred, one level: the next
/// `max_length` tokens after each of its `max_occurrences` latest occurrences, believed with
/// `trust`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NgramParams {
    pub min_ngram: usize,
    pub max_ngram: usize,
    pub max_length: usize,
    pub max_occurrences: usize,
    pub trust: f64,
}

/// How the datastore drafts: `levels` back-off searches with `query` (the first for the longest
/// matching suffix, each next one for the longest suffix shorter than the last match), each
/// answer a level believed with `match_trust(trust, its match length)`; all of a step's searches
/// given up after `deadline`.
#[derive(Clone, Debug)]
pub struct RetrievalParams {
    pub query: Query,
    pub levels: usize,
    pub trust: f64,
    pub deadline: Option<Duration>,
}

/// The drafting state of one generation: its context, indexed as it grows.
pub struct Drafter {
    context_params: Option<NgramParams>,
    served_params: Option<NgramParams>,
    retrieval: Option<RetrievalParams>,
    context: Vec<i64>,
    context_index: NgramIndex,
    /// The datastore searches of this generation, which narrow what the last step found.
    session: SearchSession,
    scorer: Scorer,
    /// Steps whose datastore levels were lost to an error or the deadline.
    pub failures: u64,
}

impl Drafter {
    pub fn new(context: Option<NgramParams>, served: Option<NgramParams>, retrieval: Option<RetrievalParams>) -> Self {
        let max_n = context.map_or(1, |p| p.max_ngram.max(1));
        Drafter {
            context_params: context,
            served_params: served,
            retrieval,
            context: Vec::new(),
            context_index: NgramIndex::new(max_n),
            session: SearchSession::new(),
            scorer: Scorer::new(),
            failures: 0,
        }
    }

    /// The context so far.
    pub fn context(&self) -> &[i64] {
        &self.context
    }

    /// Append tokens to the context (the generation's prompt, then each step's new tokens).
    pub fn extend(&mut self, tokens: &[i64]) {
        self.context.extend_from_slice(tokens);
        if self.context_params.is_some() {
            self.context_index.extend(tokens);
        }
    }

    /// Forget the context (a new generation, or a context that does not extend the last).
    pub fn reset(&mut self) {
        self.context.clear();
        self.context_index = NgramIndex::new(self.context_index.max_n());
    }

    /// The draft tree continuing the context (whose last token is the root): at most `budget`
    /// nodes (all when None), tokens outside `0..vocab_size` dropped. `cache`: the datastore's
    /// answers for short suffixes, shared with other generations.
    #[allow(clippy::too_many_arguments)]
    pub fn draft(
        &mut self,
        served: Option<&ServedOutputs>,
        datastore: Option<&Datastore>,
        cache: Option<&Mutex<LevelCache>>,
        extra: &[Level],
        budget: Option<usize>,
        vocab_size: Option<u64>,
    ) -> Result<DraftTree, ScoreError> {
        let trees = match (&self.retrieval, datastore) {
            (Some(retrieval), Some(datastore)) => match datastore_levels(&mut self.session, cache, datastore, &self.context, retrieval) {
                Some(trees) => trees,
                None => {
                    self.failures += 1;
                    Vec::new()
                }
            },
            _ => Vec::new(),
        };
        let tries: Vec<(u32, f64, Vec<i64>, Vec<i64>, Vec<f64>)> = trees
            .into_iter()
            .filter(|t| !t.tokens.is_empty() && t.occurrences > 0)
            .map(|t| {
                (
                    t.match_length,
                    t.occurrences as f64,
                    t.tokens.iter().map(|&x| x as i64).collect(),
                    t.parents.iter().map(|&x| x as i64).collect(),
                    t.counts.iter().map(|&x| x as f64).collect(),
                )
            })
            .collect();
        let mut levels: Vec<Level> = Vec::new();
        if let Some(params) = &self.context_params {
            ngram_levels(std::slice::from_ref(&self.context_index), &self.context, params, &mut levels);
        }
        if let (Some(params), Some(served)) = (&self.served_params, served) {
            let indexes: Vec<&NgramIndex> = served.newest_first().collect();
            ngram_levels_of(&indexes, &self.context, params, &mut levels);
        }
        if let Some(retrieval) = &self.retrieval {
            for (match_length, occurrences, tokens, parents, counts) in &tries {
                levels.push(Level {
                    match_length: *match_length,
                    occurrences: *occurrences,
                    trust: match_trust(retrieval.trust, *match_length),
                    counts: LevelCounts::Trie { tokens, parents, counts },
                });
            }
        }
        levels.extend(extra.iter().cloned());
        self.scorer.score(&levels, budget, vocab_size)
    }
}

/// Tokens: a datastore match longer than this needs proportionally less trust.
pub const SPECIFIC_MATCH: u32 = 4;

/// The trust of a datastore level (`decoder.draft_sources.match_trust`): `trust` for a match of
/// up to `SPECIFIC_MATCH` tokens, divided by match_length / SPECIFIC_MATCH beyond: a long match is
/// specific, and few occurrences of it are enough to believe it.
pub fn match_trust(trust: f64, match_length: u32) -> f64 {
    trust * SPECIFIC_MATCH as f64 / match_length.max(SPECIFIC_MATCH) as f64
}

/// The datastore's back-off levels for `context`, or None when a search failed or ran past the
/// deadline (the step then drafts without the datastore). The first level goes through the
/// generation's search session; each next one is the search whose `max_span` is one less than
/// the last match (what `Datastore::search_levels` answers). Answers for short suffixes come
/// from `cache` when it has them (see `short_answer`).
fn datastore_levels(
    session: &mut SearchSession,
    cache: Option<&Mutex<LevelCache>>,
    datastore: &Datastore,
    context: &[i64],
    retrieval: &RetrievalParams,
) -> Option<Vec<Tree>> {
    if context.is_empty() {
        return Some(Vec::new());
    }
    let query = &retrieval.query;
    let cancel = Cancel::at(retrieval.deadline.map(|d| Instant::now() + d));
    // Only the last max_span tokens can be matched (what a remote retriever is sent, too).
    let tail = &context[context.len().saturating_sub(query.max_span)..];
    let identity = cache.map(|_| datastore_identity(datastore));
    let search = |session: Option<&mut SearchSession>, suffix: &[i64], q: &Query| -> Option<Tree> {
        let found = match session {
            Some(session) => session.search_levels_cancellable(datastore, suffix, q, 1, None, &cancel),
            None => datastore.search_levels_cancellable(suffix, q, 1, None, &cancel),
        };
        found.ok()??.trees.into_iter().next()
    };
    let first = match (cache, identity) {
        // An exact-policy tree depends on the matched suffix only: when the longest match is
        // short, the tree is the short suffix's, which the cache may hold. Finding the match
        // alone (a budget of 0) costs a few microseconds; growing a short suffix's tree, much
        // more.
        (Some(cache), Some(id)) if query.policy == Policy::Exact && query.budget > 0 => {
            let probe = search(Some(session), tail, &Query { budget: 0, ..query.clone() })?;
            let m = probe.match_length as usize;
            if m == 0 {
                return Some(Vec::new());
            }
            match CacheKey::new(id, &Query { max_span: m, ..query.clone() }, &tail[tail.len() - m..]) {
                Some(key) => short_answer(cache, key, || search(None, &tail[tail.len() - m..], &Query { max_span: m, ..query.clone() }))?,
                None => search(Some(session), tail, query)?,
            }
        }
        _ => search(Some(session), tail, query)?,
    };
    if first.match_length == 0 {
        return Some(Vec::new());
    }
    let mut trees = vec![first];
    while trees.len() < retrieval.levels {
        let span = trees[trees.len() - 1].match_length as usize - 1;
        if span < query.min_span.max(1) {
            break;
        }
        let suffix = &tail[tail.len() - span..];
        let level_query = Query { max_span: span, ..query.clone() };
        let key = identity.and_then(|id| CacheKey::new(id, &level_query, suffix));
        let tree = match (cache, key) {
            (Some(cache), Some(key)) => short_answer(cache, key, || search(None, suffix, &level_query))?,
            _ => search(None, suffix, &level_query)?,
        };
        if tree.match_length == 0 {
            break;
        }
        trees.push(tree);
    }
    Some(trees)
}

/// The cached answer for `key`, or `search`'s (kept when it finished).
fn short_answer(cache: &Mutex<LevelCache>, key: CacheKey, search: impl FnOnce() -> Option<Tree>) -> Option<Tree> {
    if let Some(tree) = lock(cache).get(&key) {
        return Some(tree);
    }
    let tree = search()?;
    lock(cache).insert(key, tree.clone());
    Some(tree)
}

fn lock(cache: &Mutex<LevelCache>) -> std::sync::MutexGuard<'_, LevelCache> {
    // A cache left by a panicking thread holds whole answers only: still good.
    cache.lock().unwrap_or_else(|e| e.into_inner())
}

fn ngram_levels<'a>(indexes: &'a [NgramIndex], context: &[i64], params: &NgramParams, levels: &mut Vec<Level<'a>>) {
    let refs: Vec<&'a NgramIndex> = indexes.iter().collect();
    ngram_levels_of(&refs, context, params, levels)
}

/// For each n from `max_ngram` down to `min_ngram` whose n-gram (the context's last n tokens)
/// occurred in `indexes` (newest first): one level, the continuations after its latest
/// `max_occurrences` occurrences (the newest index's first, each index's oldest first).
fn ngram_levels_of<'a>(indexes: &[&'a NgramIndex], context: &[i64], params: &NgramParams, levels: &mut Vec<Level<'a>>) {
    let suffix = &context[context.len().saturating_sub(params.max_ngram)..];
    let found: Vec<Vec<&'a [u32]>> = indexes
        .iter()
        .map(|index| {
            let mut out = Vec::new();
            index.suffix_positions(suffix, &mut out);
            out
        })
        .collect();
    for n in (params.min_ngram..=suffix.len()).rev() {
        let mut wanted = params.max_occurrences;
        let mut rows: Vec<&'a [i64]> = Vec::new();
        for (index, positions) in indexes.iter().zip(&found) {
            let Some(all) = positions.get(n - 1) else { continue };
            let latest = &all[all.len().saturating_sub(wanted)..];
            rows.extend(latest.iter().map(|&p| index.row(p, params.max_length)));
            wanted -= latest.len();
            if wanted == 0 {
                break;
            }
        }
        if !rows.is_empty() {
            levels.push(Level {
                match_length: n as u32,
                occurrences: rows.len() as f64,
                trust: params.trust,
                counts: LevelCounts::Rows(rows),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONTEXT: NgramParams = NgramParams { min_ngram: 1, max_ngram: 4, max_length: 10, max_occurrences: 32, trust: 1.0 };

    #[test]
    fn the_context_drafts_what_followed_its_suffix_before() {
        let mut drafter = Drafter::new(Some(CONTEXT), None, None);
        drafter.extend(&[5, 6, 7, 8, 5, 6]);
        let tree = drafter.draft(None, None, None, &[], None, None).unwrap();
        // 5 6 was followed by 7 8 5 6: the chain, best first.
        assert_eq!(&tree.tokens[..4], &[7, 8, 5, 6]);
        assert_eq!(&tree.parents[..4], &[-1, 0, 1, 2]);
        drafter.extend(&[9]);
        assert!(drafter.draft(None, None, None, &[], None, None).unwrap().is_empty()); // 9 is new
    }

    #[test]
    fn served_outputs_newest_first_and_capped_occurrences() {
        let served_params = NgramParams { max_occurrences: 2, ..CONTEXT };
        let mut served = ServedOutputs::new(4, 1 << 16, 4);
        served.add(&[1, 2, 3]);
        served.add(&[1, 2, 4]);
        served.add(&[1, 2, 5]);
        let mut drafter = Drafter::new(None, Some(served_params), None);
        drafter.extend(&[0, 1, 2]);
        let tree = drafter.draft(Some(&served), None, None, &[], None, None).unwrap();
        // The two latest occurrences of 1 2 (all in one segment): 4 and 5; 3 is left out.
        let mut firsts: Vec<u32> = tree.tokens.iter().zip(&tree.parents).filter(|(_, &p)| p < 0).map(|(&t, _)| t).collect();
        firsts.sort();
        assert_eq!(firsts, vec![4, 5]);
    }

    #[test]
    fn a_long_match_needs_proportionally_less_trust() {
        let got: Vec<f64> = [1, 4, 5, 8, 16].iter().map(|&m| match_trust(16.0, m)).collect();
        assert_eq!(got, vec![16.0, 16.0, 12.8, 8.0, 4.0]);
    }

    #[test]
    fn extra_levels_are_scored_with_the_rest() {
        let mut drafter = Drafter::new(None, None, None);
        drafter.extend(&[3]);
        let extra = [Level {
            match_length: 1,
            occurrences: 2.0,
            trust: 0.0,
            counts: LevelCounts::Trie { tokens: &[8, 9], parents: &[-1, 0], counts: &[2.0, 1.0] },
        }];
        let tree = drafter.draft(None, None, None, &extra, Some(1), None).unwrap();
        assert_eq!((tree.tokens, tree.parents, tree.scores), (vec![8], vec![-1], vec![1.0]));
    }
}
