//! One generation's drafting: every step's levels from the context, the served outputs and the
//! datastore, and levels given from outside (remote shards, other sources), scored into one tree
//! in one call. The reference is `decoder.draft_sources` with `decoder.draft_tree`: the same
//! levels in the same order (context, served outputs, datastore, then the given ones), the same
//! scorer.

use super::ngram::{NgramIndex, ServedOutputs};
use super::score::{DraftTree, Level, LevelCounts, ScoreError, Scorer};
use crate::datastore::{Datastore, Policy, Query};
use crate::search::Tree;
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
/// answer a level believed with `trust`; all of a step's searches given up after `deadline`
/// (exact policy only: a REST-policy search cannot stop early).
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
    /// nodes (all when None), tokens outside `0..vocab_size` dropped.
    pub fn draft(
        &mut self,
        served: Option<&ServedOutputs>,
        datastore: Option<&Datastore>,
        extra: &[Level],
        budget: Option<usize>,
        vocab_size: Option<u64>,
    ) -> Result<DraftTree, ScoreError> {
        let trees = match (&self.retrieval, datastore) {
            (Some(retrieval), Some(datastore)) => match datastore_levels(datastore, &self.context, retrieval) {
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
                    trust: retrieval.trust,
                    counts: LevelCounts::Trie { tokens, parents, counts },
                });
            }
        }
        levels.extend(extra.iter().cloned());
        self.scorer.score(&levels, budget, vocab_size)
    }
}

/// The datastore's back-off levels for `context`, or None when a search failed or ran past the
/// deadline (the step then drafts without the datastore).
fn datastore_levels(datastore: &Datastore, context: &[i64], retrieval: &RetrievalParams) -> Option<Vec<Tree>> {
    let query = &retrieval.query;
    let stop_at = match query.policy {
        Policy::Exact => retrieval.deadline.map(|d| Instant::now() + d),
        Policy::Rest => None,
    };
    let mut trees: Vec<Tree> = Vec::new();
    let mut span = query.max_span;
    while trees.len() < retrieval.levels && span >= query.min_span && !context.is_empty() {
        let level_query = Query { max_span: span, ..query.clone() };
        let tail = &context[context.len().saturating_sub(span)..];
        let tree = datastore.search_until(tail, &level_query, None, stop_at).ok()??;
        if tree.match_length == 0 {
            break;
        }
        span = tree.match_length as usize - 1;
        trees.push(tree);
    }
    Some(trees)
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
        let tree = drafter.draft(None, None, &[], None, None).unwrap();
        // 5 6 was followed by 7 8 5 6: the chain, best first.
        assert_eq!(&tree.tokens[..4], &[7, 8, 5, 6]);
        assert_eq!(&tree.parents[..4], &[-1, 0, 1, 2]);
        drafter.extend(&[9]);
        assert!(drafter.draft(None, None, &[], None, None).unwrap().is_empty()); // 9 is new
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
        let tree = drafter.draft(Some(&served), None, &[], None, None).unwrap();
        // The two latest occurrences of 1 2 (all in one segment): 4 and 5; 3 is left out.
        let mut firsts: Vec<u32> = tree.tokens.iter().zip(&tree.parents).filter(|(_, &p)| p < 0).map(|(&t, _)| t).collect();
        firsts.sort();
        assert_eq!(firsts, vec![4, 5]);
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
        let tree = drafter.draft(None, None, &extra, Some(1), None).unwrap();
        assert_eq!((tree.tokens, tree.parents, tree.scores), (vec![8], vec![-1], vec![1.0]));
    }
}
