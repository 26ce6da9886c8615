//! Search: the longest matching suffix of a context, and the continuation tree under it.
//!
//! All suffixes that start with a pattern form one contiguous interval of the suffix array; the
//! suffixes in an interval are sorted by the token that follows the pattern, so an interval splits
//! into one sub-interval per next token, and the size of a sub-interval is the exact occurrence
//! count of `pattern + token`. The tree is grown best-first over these counts without ever
//! enumerating occurrences.
//!
//! Corruption never panics: a suffix-array entry that points outside the token array reads as a
//! separator, so a corrupt shard gives wrong (and `verify`-detectable) results, not a crash.

use crate::cancel::Cancel;
use crate::shard::ShardView;
use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;

/// Intervals at or below this size are split by scanning every entry.
const SCAN_LIMIT: u32 = 64;
/// Large intervals are first split by sampling: `SAMPLES_PER_BUDGET * budget` samples find every
/// child whose count is at least twice the sampling stride (see `sampled_runs`).
const SAMPLES_PER_BUDGET: u32 = 2;
/// Each completion of a sampled expansion samples this many times more finely.
const REFINE_FACTOR: u32 = 8;

/// A half-open suffix-array interval `[lo, hi)` of one shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    pub shard: u32,
    pub lo: u32,
    pub hi: u32,
}

impl Span {
    pub fn len(&self) -> u64 {
        (self.hi - self.lo) as u64
    }
}

/// The continuation tree of one search (see `rest.types.SearchResult` for the contract).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tree {
    pub match_length: u32,
    pub occurrences: u64,
    pub tokens: Vec<u32>,
    pub parents: Vec<i32>,
    pub counts: Vec<u64>,
}

#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub min_span: usize,
    pub max_span: usize,
    pub budget: usize,
    pub max_depth: usize,
}

#[inline]
fn token_at(v: &ShardView, i: u32, offset: usize) -> u32 {
    match v.sa.get(i as usize) {
        Some(&pos) => v.text.get(pos as usize + offset).unwrap_or(v.separator),
        None => v.separator,
    }
}

/// Compares the first `pattern.len()` tokens of the suffix at SA index `i` with `pattern`.
/// A separator (or the end of the text) compares greater than every token id.
#[inline]
fn compare_suffix(v: &ShardView, i: u32, pattern: &[u32]) -> Ordering {
    let pos = match v.sa.get(i as usize) {
        Some(&p) => p as usize,
        None => return Ordering::Greater,
    };
    for (k, &want) in pattern.iter().enumerate() {
        let have = v.text.get(pos + k).unwrap_or(v.separator);
        match have.cmp(&want) {
            Ordering::Equal => continue,
            other => return other,
        }
    }
    Ordering::Equal
}

/// The interval of suffixes that start with `pattern` (empty when it does not occur).
pub fn pattern_interval(v: &ShardView, shard: u32, pattern: &[u32]) -> Span {
    let n = v.sa.len() as u32;
    let lo = partition(0, n, |i| compare_suffix(v, i, pattern) == Ordering::Less);
    // Most probes of a longest-match search find nothing or a few occurrences: check the first
    // candidate, then gallop to the end of the interval instead of a second binary search over
    // the whole array.
    if lo == n || compare_suffix(v, lo, pattern) != Ordering::Equal {
        return Span { shard, lo, hi: lo };
    }
    let hi = gallop_end(lo, n, |i| compare_suffix(v, i, pattern) == Ordering::Equal);
    Span { shard, lo, hi }
}

/// The first index in `[lo, hi)` where `is_before` turns false (it must be monotone).
#[inline]
fn partition(mut lo: u32, mut hi: u32, is_before: impl Fn(u32) -> bool) -> u32 {
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if is_before(mid) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    lo
}

/// The end of the run of indexes from `i` (where `same` holds) on which `same` holds, below `hi`
/// (galloping: O(log run length)). `same` must hold on a prefix of `[i, hi)` only.
#[inline]
fn gallop_end(i: u32, hi: u32, same: impl Fn(u32) -> bool) -> u32 {
    let mut step = 1u32;
    let mut known = i; // same(known)
    while known + step < hi && same(known + step) {
        known += step;
        step = step.saturating_mul(2);
    }
    let limit = (known + step).min(hi);
    partition(known + 1, limit, same)
}

/// The end of the run of `token` that contains index `i`.
#[inline]
fn run_end(v: &ShardView, i: u32, hi: u32, offset: usize, token: u32) -> u32 {
    gallop_end(i, hi, |j| token_at(v, j, offset) == token)
}

/// The start of the run of `token` that contains index `i`.
#[inline]
fn run_start(v: &ShardView, i: u32, lo: u32, offset: usize, token: u32) -> u32 {
    let mut step = 1u32;
    let mut known = i;
    while known >= lo + step && token_at(v, known - step, offset) == token {
        known -= step;
        step = step.saturating_mul(2);
    }
    let limit = if known >= lo + step { known - step + 1 } else { lo };
    partition(limit, known, |j| token_at(v, j, offset) != token)
}

/// Every child run `(token, lo, hi)` of `span` at `offset`, separators excluded.
fn all_runs(v: &ShardView, span: Span, offset: usize, out: &mut Vec<(u32, Span)>) {
    let mut i = span.lo;
    while i < span.hi {
        let token = token_at(v, i, offset);
        if token == v.separator {
            break; // separators sort last: the rest of the interval ends its document here
        }
        let end = if span.hi - i <= SCAN_LIMIT {
            let mut j = i + 1;
            while j < span.hi && token_at(v, j, offset) == token {
                j += 1;
            }
            j
        } else {
            run_end(v, i, span.hi, offset, token)
        };
        out.push((token, Span { shard: span.shard, lo: i, hi: end }));
        i = end;
    }
}

/// The runs found by sampling every `stride`-th entry and resolving only the tokens seen at two
/// or more consecutive samples: every run of at least `2 * stride` entries contains two samples,
/// so all of them are found, at one gallop each; a run seen at most once is shorter than
/// `2 * stride` and is left to the caller's bound. Returns that bound (`2 * stride - 1`).
fn sampled_runs(v: &ShardView, span: Span, offset: usize, stride: u32, out: &mut Vec<(u32, Span)>) -> u64 {
    let samples: Vec<(u32, u32)> = (span.lo..span.hi)
        .step_by(stride as usize)
        .map(|i| (i, token_at(v, i, offset)))
        .collect();
    let mut resolved_end = span.lo;
    for group in samples.chunk_by(|a, b| a.1 == b.1) {
        let token = group[0].1;
        if token == v.separator {
            break; // separators sort last: nothing follows
        }
        if group.len() < 2 {
            continue;
        }
        let first = group[0].0;
        let last = group[group.len() - 1].0;
        let start = run_start(v, first, resolved_end, offset, token);
        let end = run_end(v, last, span.hi, offset, token);
        out.push((token, Span { shard: span.shard, lo: start, hi: end }));
        resolved_end = end;
    }
    2 * stride as u64 - 1
}

/// A frontier entry of the best-first search.
///
/// A real entry is a child waiting to be added. A pending entry stands for the children of an
/// expanded node that sampling skipped: each of them has a count of at most `count`, so the
/// pending entry is popped (and those children enumerated exactly) before any real entry that
/// one of them could beat. Its `pushed` lists the children already pushed.
struct Candidate {
    count: u64,
    depth: u32,
    parent: i32,
    token: u32,
    pending: bool,
    spans: Vec<Span>,
    pushed: Vec<u32>,
    /// How much finer than the first expansion a pending entry samples when popped.
    refine: u32,
}

type CandidateKey = (u64, bool, Reverse<u32>, Reverse<i32>, Reverse<u32>);

impl Candidate {
    /// Larger is popped first: count desc, pending first, depth asc, parent asc, token asc.
    fn key(&self) -> CandidateKey {
        (self.count, self.pending, Reverse(self.depth), Reverse(self.parent), Reverse(self.token))
    }
}

impl PartialEq for Candidate {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}
impl Eq for Candidate {}
impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Candidate {
    fn cmp(&self, other: &Self) -> Ordering {
        self.key().cmp(&other.key())
    }
}

/// The intervals of `pattern` in every shard where it occurs.
pub fn intervals(views: &[ShardView], pattern: &[u32]) -> Vec<Span> {
    views
        .iter()
        .enumerate()
        .map(|(s, v)| pattern_interval(v, s as u32, pattern))
        .filter(|span| span.hi > span.lo)
        .collect()
}

/// The longest suffix of `context` (between `min_span` and `max_span` tokens) that occurs in any
/// shard, with its intervals. `(0, [])` when not even `min_span` tokens match.
pub fn longest_match(views: &[ShardView], context: &[u32], limits: &Limits) -> (usize, Vec<Span>) {
    let longest = limits.max_span.min(context.len());
    if longest < limits.min_span {
        return (0, Vec::new());
    }
    let suffix = |len: usize| &context[context.len() - len..];
    let mut best = intervals(views, suffix(limits.min_span));
    if best.is_empty() {
        return (0, Vec::new());
    }
    // Occurrence is monotone in the length (a suffix of an occurring suffix occurs), so the
    // length is binary searched: O(log max_span) interval searches.
    let (mut lo, mut hi) = (limits.min_span, longest);
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        let spans = intervals(views, suffix(mid));
        if spans.is_empty() {
            hi = mid - 1;
        } else {
            lo = mid;
            best = spans;
        }
    }
    (lo, best)
}

/// The exact policy: the continuation tree grown best-first by occurrence count.
pub fn exact_tree(views: &[ShardView], context: &[u32], limits: &Limits) -> Tree {
    grow_exact_tree(views, context, limits, None).expect("no time limit")
}

/// `exact_tree`, given up (`None`) when `cancel` says so while it is still growing. It is asked
/// once per expansion, and one expansion is bounded by the interval sampling, so the overrun is
/// small.
pub fn exact_tree_until(views: &[ShardView], context: &[u32], limits: &Limits, cancel: &Cancel) -> Option<Tree> {
    grow_exact_tree(views, context, limits, Some(cancel))
}

fn grow_exact_tree(views: &[ShardView], context: &[u32], limits: &Limits, cancel: Option<&Cancel>) -> Option<Tree> {
    let (match_length, root_spans) = longest_match(views, context, limits);
    let occurrences = root_spans.iter().map(Span::len).sum();
    let mut tree = Tree { match_length: match_length as u32, occurrences, ..Tree::default() };
    if match_length == 0 || limits.budget == 0 {
        return Some(tree);
    }
    let mut expansion =
        Expansion { views, match_length, budget: limits.budget as u32, heap: BinaryHeap::new() };
    expansion.expand(&root_spans, 0, -1, &[], 1);
    while tree.tokens.len() < limits.budget {
        if cancel.is_some_and(Cancel::is_cancelled) {
            return None;
        }
        let Some(c) = expansion.heap.pop() else { break };
        if c.pending {
            expansion.expand(&c.spans, c.depth - 1, c.parent, &c.pushed, c.refine);
            continue;
        }
        let index = tree.tokens.len() as i32;
        tree.tokens.push(c.token);
        tree.parents.push(c.parent);
        tree.counts.push(c.count);
        if (c.depth as usize) < limits.max_depth && tree.tokens.len() < limits.budget {
            expansion.expand(&c.spans, c.depth, index, &[], 1);
        }
    }
    Some(tree)
}

struct Expansion<'a, 'b> {
    views: &'a [ShardView<'b>],
    match_length: usize,
    budget: u32,
    heap: BinaryHeap<Candidate>,
}

impl Expansion<'_, '_> {
    /// Pushes the children of the node with `spans` at `depth` (0 = the matched suffix), except
    /// the `pushed` ones.
    ///
    /// An interval much larger than the budget is split by sampling (finer with each `refine`),
    /// which finds every child above a bound, and a pending entry with that bound stands for the
    /// rest; popped, it expands again `REFINE_FACTOR` times finer, down to a full enumeration.
    /// So a large interval is only enumerated as far as the best-first order needs.
    fn expand(&mut self, spans: &[Span], depth: u32, parent: i32, pushed: &[u32], refine: u32) {
        let offset = self.match_length + depth as usize;
        let mut runs: Vec<(u32, Span)> = Vec::new();
        let mut sampled_shards: Vec<usize> = Vec::new();
        let mut missed_bound = 0u64;
        let samples = (SAMPLES_PER_BUDGET * self.budget.max(1)).saturating_mul(refine);
        for (k, &span) in spans.iter().enumerate() {
            let v = &self.views[span.shard as usize];
            let stride = (span.hi - span.lo) / samples;
            if stride > 1 && span.hi - span.lo > SCAN_LIMIT {
                missed_bound += sampled_runs(v, span, offset, stride, &mut runs);
                sampled_shards.push(k);
            } else {
                all_runs(v, span, offset, &mut runs);
            }
        }
        if !sampled_shards.is_empty() && spans.len() > 1 {
            // A token found in one shard may have been skipped by sampling in another: take its
            // exact run in every sampled shard so that the merged counts are exact.
            let mut tokens: Vec<u32> = runs.iter().map(|r| r.0).collect();
            tokens.sort_unstable();
            tokens.dedup();
            let sampled: Vec<u32> = sampled_shards.iter().map(|&k| spans[k].shard).collect();
            runs.retain(|r| !sampled.contains(&r.1.shard));
            for &k in &sampled_shards {
                exact_runs_of(&self.views[spans[k].shard as usize], spans[k], offset, &tokens, &mut runs);
            }
        }
        runs.sort_unstable_by_key(|r| (r.0, r.1.shard));
        // Only a pending entry needs the tokens already pushed under this node.
        let mut all_pushed = if missed_bound > 0 { pushed.to_vec() } else { Vec::new() };
        for group in runs.chunk_by(|a, b| a.0 == b.0) {
            let token = group[0].0;
            // `pushed` is sorted (see below): a completion of a huge interval checks thousands
            // of tokens against thousands of pushed ones.
            if pushed.binary_search(&token).is_ok() {
                continue;
            }
            if missed_bound > 0 {
                all_pushed.push(token);
            }
            let merged: Vec<Span> = group.iter().map(|r| r.1).collect();
            let count = merged.iter().map(Span::len).sum();
            self.heap.push(Candidate {
                count,
                depth: depth + 1,
                parent,
                token,
                pending: false,
                spans: merged,
                pushed: Vec::new(),
                refine: 1,
            });
        }
        if missed_bound > 0 {
            all_pushed.sort_unstable();
            self.heap.push(Candidate {
                count: missed_bound,
                depth: depth + 1,
                parent,
                token: 0,
                pending: true,
                spans: spans.to_vec(),
                pushed: all_pushed,
                refine: refine.saturating_mul(REFINE_FACTOR),
            });
        }
    }
}

/// The exact run of each of `tokens` (sorted) inside `span` at `offset`, where it occurs.
fn exact_runs_of(v: &ShardView, span: Span, offset: usize, tokens: &[u32], out: &mut Vec<(u32, Span)>) {
    for &token in tokens {
        let lo = partition(span.lo, span.hi, |j| token_at(v, j, offset) < token);
        let hi = partition(lo, span.hi, |j| token_at(v, j, offset) <= token);
        if hi > lo {
            out.push((token, Span { shard: span.shard, lo, hi }));
        }
    }
}
