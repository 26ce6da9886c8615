//! Search: the longest matching suffix of a context, and the continuation tree under it.
//!
//! All suffixes that start with a pattern form one contiguous interval of the suffix array; the
//! suffixes in an interval are sorted by the token that follows the pattern, so an interval splits
//! into one sub-interval per next token, and the size of a sub-interval is the exact occurrence
//! count of `pattern + token`. The tree is grown best-first over these counts without ever
//! enumerating occurrences of large intervals.
//!
//! Two ways of splitting a node, chosen by its size, with the same result:
//! - a large interval is split in the suffix array itself (sampling first, see `sampled_runs`);
//! - a small one (at most `DENSE_LIMIT` occurrences, the usual case for a long match) has its
//!   continuations copied once into a small sorted table of rows (`Block`), and its whole subtree
//!   is split there: one pass over the occurrences instead of one random access per occurrence
//!   and tree level.
//!
//! A `Searcher` holds the scratch buffers (a warm one allocates only the answer) and, when it
//! remembers (`Searcher::remembering`, one per decoding session: `crate::session`), the patterns
//! its last search probed, present or absent. The next context of a session usually extends the
//! last one by the accepted tokens, so most probes of the next search start with a remembered
//! pattern: its interval is narrowed by the new tokens instead of searched afresh, and a
//! remembered absent pattern bounds the match length. Every answer equals the stateless one.
//!
//! Corruption never panics: a suffix-array entry that points outside the token array reads as a
//! separator, so a corrupt shard gives wrong (and `verify`-detectable) results, not a crash.

use crate::cancel::Cancel;
use crate::shard::{ShardView, Text};
use std::cell::RefCell;
use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;

/// Intervals at or below this size are split by scanning every entry.
const SCAN_LIMIT: u32 = 64;
/// Large intervals are first split by sampling: `SAMPLES_PER_BUDGET * budget` samples find every
/// child whose count is at least twice the sampling stride (see `sampled_runs`).
const SAMPLES_PER_BUDGET: u32 = 2;
/// Each completion of a sampled expansion samples this many times more finely.
const REFINE_FACTOR: u32 = 8;
/// A node with at most this many occurrences is split in a table of its continuations (a
/// `Block`) rather than in the suffix array.
const DENSE_LIMIT: u64 = 64;
/// A longest-match search whose shortest suffix has at most this many occurrences reads the
/// tokens before each of them (one cache miss each, and the tree reads the same lines) instead
/// of binary searching over the lengths (several interval searches of two misses per step).
const EXTEND_LIMIT: u64 = 128;
/// A root with at most this many occurrences (and continuation cells) gets its tree from the
/// trie of its continuations (`Searcher::dense_tree`), at a fraction of the instructions of the
/// best-first split. It reads every occurrence, which sampling a larger root need not: past
/// about 128, cache misses cost more than the instructions saved (100M tokens, budget 64).
const DENSE_ROOT_LIMIT: u64 = 128;
const DENSE_ROOT_CELLS: u64 = 16 * 1024;
/// How many remembered-prefix probes the longest-match search tries, longest first, before it
/// falls back to a binary search over the remaining lengths.
const REMEMBERED_PROBES: usize = 3;
/// A search that can be cancelled asks at its first step and every this many steps after (asking
/// reads the clock when there is a deadline).
const CHECK_EVERY: u32 = 8;
/// Marks the end of a row (a document boundary or the end of the text); greater than every token.
const ROW_END: u32 = u32::MAX;

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

    pub fn is_empty(&self) -> bool {
        self.hi == self.lo
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
    /// The largest count of a node the budget left out: a node at most `max_depth` deep whose
    /// parent is in the tree (or that follows the suffix directly) but which is not in the tree
    /// itself; 0 when the budget left nothing out.
    pub cut_count: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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

/// Compares the tokens `from..pattern.len()` of the suffix at SA index `i` with those of
/// `pattern`. A separator (or the end of the text) compares greater than every token id.
#[inline]
fn compare_suffix(v: &ShardView, i: u32, pattern: &[u32], from: usize) -> Ordering {
    let pos = match v.sa.get(i as usize) {
        Some(&p) => p as usize,
        None => return Ordering::Greater,
    };
    for (k, &want) in pattern.iter().enumerate().skip(from) {
        let have = v.text.get(pos + k).unwrap_or(v.separator);
        match have.cmp(&want) {
            Ordering::Equal => continue,
            other => return other,
        }
    }
    Ordering::Equal
}

/// The interval of suffixes that start with `pattern` (empty when it does not occur), searched
/// inside the interval of its first two tokens, itself found inside the first token's
/// (`search_index`).
pub fn pattern_interval(v: &ShardView, shard: u32, pattern: &[u32]) -> Span {
    let Some(&first) = pattern.first() else {
        return Span { shard, lo: 0, hi: v.sa.len() as u32 };
    };
    let (start, end) = v.first_tokens.get(first, || {
        let span = interval_in(v, shard, 0, v.sa.len() as u32, &pattern[..1], 0);
        (span.lo, span.hi)
    });
    if pattern.len() == 1 || start == end {
        return Span { shard, lo: start, hi: end };
    }
    let (start, end) = v.token_pairs.get(first, pattern[1], || {
        let span = interval_in(v, shard, start, end, &pattern[..2], 1);
        (span.lo, span.hi)
    });
    if pattern.len() == 2 || start == end {
        return Span { shard, lo: start, hi: end };
    }
    interval_in(v, shard, start, end, pattern, 2)
}

/// The interval of `pattern` inside `[start, end)`, where every suffix starts with the first
/// `from` tokens of `pattern`.
fn interval_in(v: &ShardView, shard: u32, start: u32, end: u32, pattern: &[u32], from: usize) -> Span {
    let lo = partition_touching(start, end, |i| compare_suffix(v, i, pattern, from) == Ordering::Less, |i| touch(v.sa, i));
    // Most probes of a longest-match search find nothing or a few occurrences: check the first
    // candidate, then gallop to the end of the interval instead of a second binary search.
    if lo == end || compare_suffix(v, lo, pattern, from) != Ordering::Equal {
        return Span { shard, lo, hi: lo };
    }
    let hi = gallop_end(lo, end, |i| compare_suffix(v, i, pattern, from) == Ordering::Equal);
    Span { shard, lo, hi }
}

/// The sub-interval of `span` (the interval of some pattern of `offset` tokens) whose suffixes
/// continue with `token` at `offset`.
#[inline]
fn narrow(v: &ShardView, span: Span, offset: usize, token: u32) -> Span {
    let lo = partition_touching(span.lo, span.hi, |j| token_at(v, j, offset) < token, |j| touch(v.sa, j));
    if lo == span.hi || token_at(v, lo, offset) != token {
        return Span { lo, hi: lo, ..span };
    }
    let hi = gallop_end(lo, span.hi, |j| token_at(v, j, offset) == token);
    Span { lo, hi, ..span }
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

/// `partition`, reading ahead: each step also reads the suffix-array entries that the next step
/// may look at (the middles of both halves). A step over a large mapped suffix array otherwise
/// waits for two cache misses one after the other (the entry, then the tokens it points to);
/// read ahead, the next entry arrives while this step's tokens do.
#[inline]
fn partition_touching(mut lo: u32, mut hi: u32, is_before: impl Fn(u32) -> bool, read: impl Fn(u32)) -> u32 {
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if hi - lo > 2 {
            read(lo + (mid - lo) / 2);
            read(mid + 1 + (hi - mid - 1) / 2);
        }
        if is_before(mid) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    lo
}

/// Reads `sa[i]` (if there is one) only to have it cached for a step to come.
#[inline]
fn touch(sa: &[u32], i: u32) {
    if let Some(&x) = sa.get(i as usize) {
        std::hint::black_box(x);
    }
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

/// Every child run `(token, span)` of `span` at `offset`, separators excluded.
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
    let mut resolved_end = span.lo;
    let mut i = span.lo;
    while i < span.hi {
        let token = token_at(v, i, offset);
        if token == v.separator {
            break; // separators sort last: nothing follows
        }
        // The samples i, i + stride, ... that show `token`.
        let mut last = i;
        while last + stride < span.hi && token_at(v, last + stride, offset) == token {
            last += stride;
        }
        if last > i {
            let start = run_start(v, i, resolved_end, offset, token);
            let end = run_end(v, last, span.hi, offset, token);
            out.push((token, Span { shard: span.shard, lo: start, hi: end }));
            resolved_end = end;
        }
        i = last + stride;
    }
    2 * stride as u64 - 1
}

/// Copies `text` into `cells` up to the first separator (the rest of `cells` is left as it is).
#[inline]
fn fill_row<T: Copy + Into<u32>>(cells: &mut [u32], text: &[T], separator: u32) {
    for (cell, &t) in cells.iter_mut().zip(text) {
        let t = t.into();
        if t == separator {
            break;
        }
        *cell = t;
    }
}

/// The exact run of each of `tokens` (sorted) inside `span` at `offset`, where it occurs.
fn exact_runs_of(v: &ShardView, span: Span, offset: usize, tokens: &[u32], out: &mut Vec<(u32, Span)>) {
    for &token in tokens {
        let found = narrow(v, span, offset, token);
        if !found.is_empty() {
            out.push((token, found));
        }
    }
}

/// The intervals of `pattern` in every shard where it occurs.
pub fn intervals(views: &[ShardView], pattern: &[u32]) -> Vec<Span> {
    let mut out = Vec::new();
    push_intervals(views, pattern, &mut out);
    out
}

fn push_intervals(views: &[ShardView], pattern: &[u32], out: &mut Vec<Span>) {
    for (s, v) in views.iter().enumerate() {
        let span = pattern_interval(v, s as u32, pattern);
        if !span.is_empty() {
            out.push(span);
        }
    }
}

/// The longest suffix of `context` of at most `hi` tokens that occurs, found from `spans`, the
/// intervals of its suffix of `len` tokens (which occurs, `len <= hi`): an occurrence of a longer
/// suffix ends with an occurrence of that one, so the longest match is `len` plus the longest run
/// of context tokens found just before one of its occurrences.
/// Each occurrence's `(shard, position, tokens matched before it)` is left in `extended`, in
/// suffix-array order.
fn longest_extension(
    views: &[ShardView],
    spans: &[Span],
    context: &[u32],
    len: usize,
    hi: usize,
    extended: &mut Vec<(u32, u32, u32)>,
) -> usize {
    let before = &context[..context.len() - len];
    let room = hi - len;
    let mut best = 0;
    extended.clear();
    for span in spans {
        let v = &views[span.shard as usize];
        for i in span.lo..span.hi {
            let Some(&pos) = v.sa.get(i as usize) else { continue };
            let at = pos as usize;
            let mut e = 0;
            while e < room && e < at && v.text.get(at - 1 - e) == Some(before[before.len() - 1 - e]) {
                e += 1;
            }
            best = best.max(e);
            extended.push((span.shard, pos, e as u32));
        }
    }
    len + best
}

/// The longest suffix of `context` (between `min_span` and `max_span` tokens) that occurs in any
/// shard, with its intervals. `(0, [])` when not even `min_span` tokens match.
pub fn longest_match(views: &[ShardView], context: &[u32], limits: &Limits) -> (usize, Vec<Span>) {
    with_scratch(|s| {
        let m = s.longest_match(views, context, limits);
        if s.at_starts {
            s.probe(views, &context[context.len() - m..]);
        }
        (m, s.spans.clone())
    })
}

/// The exact policy: the continuation tree grown best-first by occurrence count.
pub fn exact_tree(views: &[ShardView], context: &[u32], limits: &Limits) -> Tree {
    exact_levels(views, context, limits, 1).pop().expect("one level")
}

/// `exact_tree`, given up (`None`) when `cancel` says so while it is still growing. It is asked
/// every few expansions, and one expansion is bounded by the interval sampling, so the overrun
/// is small.
pub fn exact_tree_until(views: &[ShardView], context: &[u32], limits: &Limits, cancel: &Cancel) -> Option<Tree> {
    exact_levels_until(views, context, limits, 1, cancel).map(|mut t| t.pop().expect("one level"))
}

/// The back-off levels of the exact policy: the tree of the longest match (length `m`), then the
/// trees of the suffixes of `m - 1`, `m - 2`, ... tokens while they are at least `min_span` long,
/// at most `levels` trees (and always the first, even when nothing matched). Level `k` equals
/// `exact_tree` with `max_span = m - k + 1`.
pub fn exact_levels(views: &[ShardView], context: &[u32], limits: &Limits, levels: usize) -> Vec<Tree> {
    exact_levels_until(views, context, limits, levels, &Cancel::never()).expect("never cancelled")
}

/// `exact_levels`, given up (`None`) when `cancel` says so before it finished.
pub fn exact_levels_until(
    views: &[ShardView],
    context: &[u32],
    limits: &Limits,
    levels: usize,
    cancel: &Cancel,
) -> Option<Vec<Tree>> {
    with_scratch(|s| s.exact_levels(views, context, limits, levels, cancel))
}

thread_local! {
    /// Scratch buffers for stateless searches: a thread's searches reuse them instead of
    /// allocating. It never remembers patterns: it serves searches of any datastore.
    static SCRATCH: RefCell<Searcher> = RefCell::new(Searcher::new());
}

/// Runs `f` with this thread's scratch searcher (one that never remembers).
pub(crate) fn with_scratch<T>(f: impl FnOnce(&mut Searcher) -> T) -> T {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut searcher) => f(&mut searcher),
        Err(_) => f(&mut Searcher::new()), // re-entered (never in practice): a fresh one
    })
}

/// A tree node's occurrences: intervals of the suffix array, or rows of a block.
#[derive(Clone, Copy, Debug)]
enum Node {
    /// `spans[start..start + n]` of the searcher.
    Sa { start: u32, n: u32 },
    /// Rows `lo..hi` of block `block`.
    Rows { block: u32, lo: u32, hi: u32 },
}

/// The continuations of a small node, copied out of the text: row `r` holds the `width` tokens
/// after the occurrence (`ROW_END` from a document boundary on), rows sorted as in the suffix
/// array. Splitting a node of depth `depth + c` inside the block reads column `c`.
#[derive(Clone, Copy, Debug)]
struct Block {
    start: usize,
    width: u32,
    depth: u32,
}

/// A child found by an expansion, waiting in its family (the children of one expansion, sorted
/// by count desc, then token asc) to be added.
#[derive(Clone, Copy, Debug)]
struct Child {
    token: u32,
    count: u64,
    node: Node,
}

/// What an expansion that sampled left open: children of `spans` at `depth` not yet found,
/// each with a count of at most the entry's count; `pushed` lists the tokens already found.
#[derive(Clone, Copy, Debug)]
struct Pending {
    spans: (u32, u32),
    pushed: (u32, u32),
    refine: u32,
}

/// A frontier entry of the best-first search.
///
/// A real entry is the best child of a family not yet added (`at` in the searcher's children,
/// the family ending at `end`): the family's next child is pushed when it is popped, which
/// gives the same order as pushing every child at once. A pending entry (`at` in the pendings)
/// stands for the children sampling skipped: it is popped (and those children found exactly)
/// before any real entry that one of them could beat.
#[derive(Clone, Copy, Debug)]
struct Entry {
    /// The order of the search in one integer (larger is popped first): count desc, pending
    /// first, depth asc, parent asc, token asc. See `Entry::new`.
    key: u128,
    at: u32,
    end: u32,
}

/// The most nodes a tree may have and the deepest it may be, for `Entry`'s packed key.
pub const MAX_BUDGET: usize = (1 << 22) - 2;
pub const MAX_DEPTH: usize = 510;

impl Entry {
    #[inline]
    fn new(count: u64, pending: bool, depth: u32, parent: i32, token: u32, at: u32, end: u32) -> Self {
        debug_assert!(depth as usize <= MAX_DEPTH + 1 && parent < MAX_BUDGET as i32);
        let order = ((pending as u64) << 63)
            | ((511 - depth as u64) << 54)
            | ((((1u64 << 22) - 1) - (parent + 1) as u64) << 32)
            | (u32::MAX - token) as u64;
        Entry { key: ((count as u128) << 64) | order as u128, at, end }
    }

    #[inline]
    fn count(&self) -> u64 {
        (self.key >> 64) as u64
    }
    #[inline]
    fn pending(&self) -> bool {
        (self.key >> 63) & 1 == 1
    }
    #[inline]
    fn depth(&self) -> u32 {
        511 - ((self.key >> 54) & 511) as u32
    }
    #[inline]
    fn parent(&self) -> i32 {
        (((1u64 << 22) - 1) - ((self.key >> 32) as u64 & ((1 << 22) - 1))) as i32 - 1
    }
    #[inline]
    fn token(&self) -> u32 {
        u32::MAX - self.key as u32
    }
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        self.key == other.key
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Entry {
    fn cmp(&self, other: &Self) -> Ordering {
        self.key.cmp(&other.key)
    }
}

/// A pattern a remembering searcher has probed: present with its intervals, or absent.
#[derive(Clone, Copy, Debug)]
struct Probed {
    tokens: (u32, u32),
    /// `None`: the pattern does not occur.
    spans: Option<(u32, u32)>,
}

/// What a remembering searcher knows from one search: the patterns it probed.
#[derive(Default)]
struct Memory {
    probed: Vec<Probed>,
    tokens: Vec<u32>,
    spans: Vec<Span>,
}

impl Memory {
    fn clear(&mut self) {
        self.probed.clear();
        self.tokens.clear();
        self.spans.clear();
    }

    fn tokens_of(&self, p: &Probed) -> &[u32] {
        &self.tokens[p.tokens.0 as usize..(p.tokens.0 + p.tokens.1) as usize]
    }

    fn spans_of(&self, range: (u32, u32)) -> &[Span] {
        &self.spans[range.0 as usize..(range.0 + range.1) as usize]
    }

    /// Adds what `other` probed.
    fn absorb(&mut self, other: &Memory) {
        for p in &other.probed {
            self.record(other.tokens_of(p), p.spans.map(|range| other.spans_of(range)));
        }
    }

    fn record(&mut self, pattern: &[u32], spans: Option<&[Span]>) {
        let tokens = (self.tokens.len() as u32, pattern.len() as u32);
        self.tokens.extend_from_slice(pattern);
        let spans = spans.map(|s| {
            let range = (self.spans.len() as u32, s.len() as u32);
            self.spans.extend_from_slice(s);
            range
        });
        self.probed.push(Probed { tokens, spans });
    }

    /// The longest probed pattern that `pattern` starts with.
    fn longest_prefix_of(&self, pattern: &[u32]) -> Option<&Probed> {
        self.probed
            .iter()
            .filter(|p| p.tokens.1 as usize <= pattern.len() && pattern.starts_with(self.tokens_of(p)))
            .max_by_key(|p| p.tokens.1)
    }
}

/// A remembering searcher's search that was given up halfway (cancelled): what it was asked, the
/// trees it finished and the patterns it probed, so that the same search asked again (a server
/// hands a search whose inline slice ran out to a worker) resumes instead of starting over.
/// The finished trees depend only on the shards (the searcher is bound to them: `bind` forgets
/// this too), the context's tail and the limits.
struct Unfinished {
    context: Vec<u32>,
    limits: Limits,
    levels: usize,
    trees: Vec<Tree>,
    probed: Memory,
}

/// Search state reused from search to search: scratch buffers, and for a remembering searcher
/// the patterns its last search probed (see the module documentation), and the search it gave
/// up halfway, if its last one was (`Unfinished`). A remembering searcher
/// must only ever search the same shards (`crate::session::SearchSession` sees to it).
pub struct Searcher {
    remember: bool,
    /// The shards the remembered intervals belong to (`bind`).
    shards: Vec<[u64; 4]>,
    /// What the search in progress probes, and what the last one did.
    memory: Memory,
    last: Memory,
    unfinished: Option<Unfinished>,
    /// The intervals of the last probe (`probe`'s output).
    spans: Vec<Span>,
    /// The intervals of the longest match so far, during its binary search.
    best_spans: Vec<Span>,
    /// Every expansion's intervals (`Node::Sa`, `Pending`) during one tree's growth.
    node_spans: Vec<Span>,
    blocks: Vec<Block>,
    rows: Vec<u32>,
    /// Rows of several shards, before they are merged into suffix-array order.
    unsorted_rows: Vec<u32>,
    row_order: Vec<u32>,
    children: Vec<Child>,
    pendings: Vec<Pending>,
    pushed: Vec<u32>,
    runs: Vec<(u32, Span)>,
    tokens: Vec<u32>,
    /// Which of an expansion's intervals were sampled.
    sampled: Vec<bool>,
    heap: BinaryHeap<Entry>,
    /// A small root's trie (`dense_tree`): its nodes, the row ranges of one level's nodes and
    /// the next's, the nodes in their order, one group's nodes, and each node's tree index.
    trie: Vec<TrieNode>,
    level: Vec<(u32, u32, u32)>,
    next_level: Vec<(u32, u32, u32)>,
    order: Vec<u64>,
    group: Vec<(u64, u32)>,
    placed: Vec<i32>,
    /// A small root's trie nodes of count 1 that have a parent of a larger count: (depth,
    /// parent, row); and the count-1 nodes placed at the last depth: (row, tree index).
    heads: Vec<(u32, u32, u32)>,
    singles: Vec<(u32, i32)>,
    /// Where the continuations of the longest match start, `(shard, token index)` in
    /// suffix-array order, when `at_starts`: the match was found from the tokens before the
    /// occurrences of a shorter suffix, and its tree is grown from those occurrences instead of
    /// searching its interval (`longest_match`). Any probe clears `at_starts`.
    starts: Vec<(u32, u32)>,
    at_starts: bool,
    /// Each occurrence's extension, during `longest_extension`: `(shard, position, tokens)`.
    extended: Vec<(u32, u32, u32)>,
}

impl Default for Searcher {
    fn default() -> Self {
        Self::new()
    }
}

impl Searcher {
    /// A searcher that remembers nothing from one search to the next.
    pub fn new() -> Self {
        Searcher {
            remember: false,
            shards: Vec::new(),
            memory: Memory::default(),
            last: Memory::default(),
            unfinished: None,
            spans: Vec::new(),
            best_spans: Vec::new(),
            node_spans: Vec::new(),
            blocks: Vec::new(),
            rows: Vec::new(),
            unsorted_rows: Vec::new(),
            row_order: Vec::new(),
            children: Vec::new(),
            pendings: Vec::new(),
            pushed: Vec::new(),
            runs: Vec::new(),
            tokens: Vec::new(),
            sampled: Vec::new(),
            heap: BinaryHeap::new(),
            trie: Vec::new(),
            level: Vec::new(),
            next_level: Vec::new(),
            order: Vec::new(),
            group: Vec::new(),
            placed: Vec::new(),
            heads: Vec::new(),
            singles: Vec::new(),
            starts: Vec::new(),
            at_starts: false,
            extended: Vec::new(),
        }
    }

    /// A searcher that remembers what its last search probed, for a session's next search.
    pub fn remembering() -> Self {
        Searcher { remember: true, ..Searcher::new() }
    }

    /// Forgets what the last search probed (and the search it gave up, if it did).
    pub fn forget(&mut self) {
        self.memory.clear();
        self.last.clear();
        self.unfinished = None;
    }

    /// Tells a remembering searcher which shards its next search covers (anything that tells
    /// their mappings and contents apart, one item per shard in search order): what it
    /// remembers is forgotten unless they are the shards of its last search.
    pub fn bind(&mut self, shards: impl Iterator<Item = [u64; 4]>) {
        if !self.remember {
            return;
        }
        let mut same = true;
        let mut n = 0;
        for (i, id) in shards.enumerate() {
            n = i + 1;
            if self.shards.get(i) != Some(&id) {
                same = false;
                self.shards.truncate(i);
                self.shards.push(id);
            }
        }
        if n != self.shards.len() {
            same = false;
            self.shards.truncate(n);
        }
        if !same {
            self.forget();
        }
    }

    /// `exact_levels` on this searcher; `None` when `cancel` said so before the search finished
    /// (asked every few steps). A remembering searcher keeps what a search given up halfway did:
    /// the patterns it probed join those the next search starts from, and the same search asked
    /// next (same context tail, limits and levels) resumes after the trees it finished.
    pub fn exact_levels(
        &mut self,
        views: &[ShardView],
        context: &[u32],
        limits: &Limits,
        levels: usize,
        cancel: &Cancel,
    ) -> Option<Vec<Tree>> {
        if !self.remember {
            return self.levels(views, context, limits, levels, cancel, Vec::new()).ok();
        }
        let resumed = self
            .unfinished
            .take()
            .filter(|u| u.levels == levels && u.limits == *limits && u.context == context);
        std::mem::swap(&mut self.memory, &mut self.last);
        self.memory.clear();
        let done = match resumed {
            Some(u) => {
                self.memory = u.probed; // this search's own probes, before it was given up
                u.trees
            }
            None => Vec::new(),
        };
        match self.levels(views, context, limits, levels, cancel, done) {
            Ok(trees) => Some(trees),
            Err(done) => {
                // The next search starts from what the last one probed and what this one did.
                let probed = std::mem::take(&mut self.memory);
                self.memory = std::mem::take(&mut self.last);
                self.memory.absorb(&probed);
                self.unfinished =
                    Some(Unfinished { context: context.to_vec(), limits: *limits, levels, trees: done, probed });
                None
            }
        }
    }

    /// The trees of `levels` back-off levels, after the `done` ones (the first levels of the
    /// same search, finished before it was given up); `Err` with the finished ones when `cancel`
    /// said so.
    fn levels(
        &mut self,
        views: &[ShardView],
        context: &[u32],
        limits: &Limits,
        levels: usize,
        cancel: &Cancel,
        done: Vec<Tree>,
    ) -> Result<Vec<Tree>, Vec<Tree>> {
        let mut trees = done;
        if trees.is_empty() {
            trees.reserve(levels.clamp(1, 16));
            let first = self.longest_match(views, context, limits);
            match self.grow(views, first, limits, cancel) {
                Some(tree) => trees.push(tree),
                None => return Err(trees),
            }
        }
        // A suffix of a suffix that occurs occurs too: level k matches exactly m - k + 1 tokens.
        let mut length = trees.last().map_or(0, |t| t.match_length as usize);
        while trees.len() < levels && length > limits.min_span {
            length -= 1;
            let found = self.probe(views, &context[context.len() - length..]);
            debug_assert!(found, "a suffix of an occurring pattern occurs");
            match self.grow(views, length, limits, cancel) {
                Some(tree) => trees.push(tree),
                None => return Err(trees),
            }
        }
        Ok(trees)
    }

    /// The length of the longest suffix of `context` within the limits that occurs (0: none),
    /// its intervals left in `self.spans`.
    fn longest_match(&mut self, views: &[ShardView], context: &[u32], limits: &Limits) -> usize {
        self.at_starts = false;
        let longest = limits.max_span.min(context.len());
        if longest < limits.min_span {
            self.spans.clear();
            return 0;
        }
        let suffix = |len: usize| &context[context.len() - len..];
        let mut hi = longest;
        if self.remember && !self.last.probed.is_empty() {
            // A suffix that starts with a pattern known to be absent is absent, and so is every
            // longer one (it ends with that suffix).
            if let Some(bound) = (limits.min_span..=longest).find(|&len| {
                matches!(self.last.longest_prefix_of(suffix(len)), Some(p) if p.spans.is_none())
            }) {
                if bound == limits.min_span {
                    self.memory.record(suffix(bound), None);
                    self.spans.clear();
                    return 0;
                }
                hi = bound - 1;
            }
            // Suffixes that extend a remembered pattern are cheap to probe: try the longest.
            for _ in 0..REMEMBERED_PROBES {
                if self.last.longest_prefix_of(suffix(hi)).is_none() {
                    break;
                }
                if self.probe(views, suffix(hi)) {
                    return hi;
                }
                if hi == limits.min_span {
                    self.spans.clear();
                    return 0;
                }
                hi -= 1;
            }
        }
        if !self.probe(views, suffix(limits.min_span)) {
            return 0;
        }
        let mut lo = limits.min_span;
        self.best_spans.clone_from(&self.spans);
        let occurrences: u64 = self.spans.iter().map(Span::len).sum();
        if lo < hi && occurrences <= EXTEND_LIMIT {
            // Few occurrences (the usual case): the tokens before them tell the longest match,
            // and only its interval is searched, instead of a binary search over the lengths.
            let m = longest_extension(views, &self.spans, context, lo, hi, &mut self.extended);
            if m < hi && self.remember {
                // Known absent without a probe: bounds the next search of the session.
                self.memory.record(suffix(m + 1), None);
            }
            if m == lo {
                return lo;
            }
            // The occurrences of the match are those that extend that far, and its tree only
            // needs where their continuations start (the same tokens follow, in the same order).
            let longest_run = (m - lo) as u32;
            let n = self.extended.iter().filter(|e| e.2 == longest_run).count() as u64;
            if n * limits.max_depth as u64 <= DENSE_ROOT_CELLS {
                self.starts.clear();
                self.starts.extend(
                    self.extended.iter().filter(|e| e.2 == longest_run).map(|e| (e.0, e.1.saturating_add(lo as u32))),
                );
                self.at_starts = true;
                return m;
            }
            if self.probe(views, suffix(m)) {
                return m;
            }
            // Only a corrupt shard (a suffix array out of order) gets here: binary search below.
            hi = m - 1;
        }
        // Occurrence is monotone in the length (a suffix of an occurring suffix occurs), so the
        // length is binary searched: O(log max_span) interval searches.
        while lo < hi {
            let mid = lo + (hi - lo).div_ceil(2);
            if self.probe(views, suffix(mid)) {
                lo = mid;
                self.best_spans.clone_from(&self.spans);
            } else {
                hi = mid - 1;
            }
        }
        std::mem::swap(&mut self.spans, &mut self.best_spans);
        lo
    }

    /// The intervals of `pattern` into `self.spans`; whether it occurs. A remembering searcher
    /// narrows the intervals of the longest remembered pattern that `pattern` starts with.
    fn probe(&mut self, views: &[ShardView], pattern: &[u32]) -> bool {
        self.at_starts = false;
        self.spans.clear();
        if self.remember {
            if let Some(known) = self.last.longest_prefix_of(pattern).copied() {
                if let Some(range) = known.spans {
                    self.spans.extend_from_slice(self.last.spans_of(range));
                    for offset in known.tokens.1 as usize..pattern.len() {
                        self.spans.retain_mut(|span| {
                            *span = narrow(&views[span.shard as usize], *span, offset, pattern[offset]);
                            !span.is_empty()
                        });
                        if self.spans.is_empty() {
                            break;
                        }
                    }
                }
            } else {
                push_intervals(views, pattern, &mut self.spans);
            }
            let found = !self.spans.is_empty();
            self.memory.record(pattern, found.then_some(&self.spans[..]));
            return found;
        }
        push_intervals(views, pattern, &mut self.spans);
        !self.spans.is_empty()
    }

    /// The tree under the pattern of `match_length` tokens whose intervals are in `self.spans`.
    fn grow(
        &mut self,
        views: &[ShardView],
        match_length: usize,
        limits: &Limits,
        cancel: &Cancel,
    ) -> Option<Tree> {
        let occurrences =
            if self.at_starts { self.starts.len() as u64 } else { self.spans.iter().map(Span::len).sum() };
        let mut tree = Tree { match_length: match_length as u32, occurrences, ..Tree::default() };
        if match_length == 0 {
            return Some(tree);
        }
        tree.tokens.reserve(limits.budget.min(256));
        tree.parents.reserve(limits.budget.min(256));
        tree.counts.reserve(limits.budget.min(256));
        self.node_spans.clear();
        self.node_spans.extend_from_slice(&self.spans);
        self.blocks.clear();
        self.rows.clear();
        // (`at_starts` holds only for such a root: see `longest_match`.)
        if self.at_starts || occurrences <= DENSE_ROOT_LIMIT && occurrences * limits.max_depth as u64 <= DENSE_ROOT_CELLS {
            // Asked once, where the best-first loop below asks at its first step.
            if limits.budget > 0 && cancel.is_cancelled() {
                return None;
            }
            if self.at_starts {
                self.copy_rows_at_starts(views, limits.max_depth);
            } else {
                let mut g = Growth { s: self, views, match_length, limits };
                g.copy_rows(0..g.s.node_spans.len(), 0);
            }
            self.dense_tree(&mut tree, limits.max_depth, limits.budget);
            return Some(tree);
        }
        self.children.clear();
        self.pendings.clear();
        self.pushed.clear();
        self.heap.clear();
        let mut g = Growth { s: self, views, match_length, limits };
        let root = Node::Sa { start: 0, n: g.s.node_spans.len() as u32 };
        g.expand(root, 0, -1, (0, 0), 1, limits.budget);
        // The node added last when the budget ran out: its children are left out by the budget.
        let mut unexpanded = None;
        let mut steps = 0u32;
        while tree.tokens.len() < limits.budget {
            steps += 1;
            if steps % CHECK_EVERY == 1 && cancel.is_cancelled() {
                return None;
            }
            let Some(e) = g.s.heap.pop() else { break };
            let (depth, parent) = (e.depth(), e.parent());
            if e.pending() {
                let p = g.s.pendings[e.at as usize];
                let room = limits.budget - tree.tokens.len();
                g.expand(Node::Sa { start: p.spans.0, n: p.spans.1 }, depth - 1, parent, p.pushed, p.refine, room);
                continue;
            }
            if e.at + 1 < e.end {
                let next = g.s.children[e.at as usize + 1];
                g.s.heap.push(Entry::new(next.count, false, depth, parent, next.token, e.at + 1, e.end));
            }
            let node = g.s.children[e.at as usize].node;
            let index = tree.tokens.len() as i32;
            tree.tokens.push(e.token());
            tree.parents.push(parent);
            tree.counts.push(e.count());
            if (depth as usize) < limits.max_depth {
                if tree.tokens.len() < limits.budget {
                    g.expand(node, depth, index, (0, 0), 1, limits.budget - tree.tokens.len());
                } else {
                    unexpanded = Some((node, depth, index));
                }
            }
        }
        if tree.tokens.len() == limits.budget {
            if let Some((node, depth, index)) = unexpanded {
                g.expand(node, depth, index, (0, 0), 1, 0);
            }
            // The best entry left is the largest count left out, once no pending entry (a bound,
            // not a count) is above it.
            while let Some(top) = g.s.heap.peek().copied() {
                if !top.pending() {
                    tree.cut_count = top.count();
                    break;
                }
                steps += 1;
                if steps % CHECK_EVERY == 1 && cancel.is_cancelled() {
                    return None;
                }
                g.s.heap.pop();
                let p = g.s.pendings[top.at as usize];
                g.expand(Node::Sa { start: p.spans.0, n: p.spans.1 }, top.depth() - 1, top.parent(), p.pushed, p.refine, 0);
            }
        }
        Some(tree)
    }
}

/// A node of a small root's trie (`Searcher::dense_tree`); `parent` indexes the trie (`NO_PARENT`:
/// a child of the root).
#[derive(Clone, Copy, Debug)]
struct TrieNode {
    count: u32,
    depth: u32,
    parent: u32,
    token: u32,
}

const NO_PARENT: u32 = u32::MAX;
/// `Searcher::dense_tree`'s order keys: `(u32::MAX - count) << 32 | depth << TRIE_BITS | node`.
const TRIE_BITS: u32 = 22;

impl Searcher {
    /// `Growth::copy_rows` of the root, from `self.starts` (see `longest_match`).
    fn copy_rows_at_starts(&mut self, views: &[ShardView], width: usize) {
        let several = self.starts.iter().any(|s| s.0 != self.starts[0].0);
        let out = if several { &mut self.unsorted_rows } else { &mut self.rows };
        out.clear();
        out.resize(self.starts.len() * width, ROW_END);
        for (cells, &(shard, at)) in out.chunks_exact_mut(width).zip(&self.starts) {
            let v = &views[shard as usize];
            let at = at as usize;
            match v.text {
                Text::U16(text) => fill_row(cells, text.get(at..).unwrap_or_default(), v.separator),
                Text::U32(text) => fill_row(cells, text.get(at..).unwrap_or_default(), v.separator),
            }
        }
        if several {
            // Each shard's rows are in order; merged as `copy_rows` merges them.
            let rows = &self.unsorted_rows;
            let row = |r: u32| &rows[r as usize * width..(r as usize + 1) * width];
            self.row_order.clear();
            self.row_order.extend(0..self.starts.len() as u32);
            self.row_order.sort_by(|&a, &b| row(a).cmp(row(b)));
            self.rows.clear();
            for &r in &self.row_order {
                self.rows.extend_from_slice(row(r));
            }
        }
        self.blocks.push(Block { start: 0, width: width as u32, depth: 0 });
    }

    /// The tree of a root with at most `DENSE_ROOT_LIMIT` occurrences, whose continuations are the
    /// single block in `self.rows` (`width` cells a row, rows in suffix-array order), into `tree`.
    ///
    /// Best-first growth adds nodes in the order (count desc, depth asc, parent asc, token asc),
    /// and each node comes after its parent in that order (its count is at most the parent's,
    /// its depth larger). For a small root every node of the trie of its rows is known at once
    /// (at most rows x width), so the tree is the first `budget` trie nodes in that order, and
    /// the cut count the count of the next one: a selection and a few small sorts instead of a
    /// heap operation and an expansion per node. The order is settled group by group of equal
    /// (count, depth), whose parents all lie in earlier groups and so have their tree index.
    fn dense_tree(&mut self, tree: &mut Tree, width: usize, budget: usize) {
        let rows = &self.rows;
        let n = (rows.len() / width) as u32;
        let cell = |r: u32, c: usize| rows[r as usize * width + c];
        // The trie, level by level: a node at depth c + 1 is a run of rows equal on c + 1 cells.
        // A node of count 1 (one row) has only count-1 nodes under it, which come after every
        // larger count: only its head is kept here (most nodes are in such chains).
        self.trie.clear();
        self.heads.clear();
        self.level.clear();
        self.level.push((0, n, NO_PARENT));
        for c in 0..width {
            self.next_level.clear();
            for &(lo, hi, parent) in &self.level {
                let mut r = lo;
                while r < hi {
                    let token = cell(r, c);
                    if token == ROW_END {
                        break; // ended rows sort last
                    }
                    let mut end = r + 1;
                    while end < hi && cell(end, c) == token {
                        end += 1;
                    }
                    if end - r == 1 {
                        self.heads.push((c as u32 + 1, parent, r));
                    } else {
                        self.next_level.push((r, end, self.trie.len() as u32));
                        self.trie.push(TrieNode { count: end - r, depth: c as u32 + 1, parent, token });
                    }
                    r = end;
                }
            }
            if self.next_level.is_empty() {
                break;
            }
            std::mem::swap(&mut self.level, &mut self.next_level);
        }
        // The first `budget + 1` nodes of count 2 or more by (count desc, depth asc), with every
        // node that ties with the last of them: ties are ordered by parent, which the trie index
        // does not tell.
        self.order.clear();
        self.order.extend(self.trie.iter().enumerate().map(|(i, node)| {
            ((u32::MAX - node.count) as u64) << 32 | (node.depth as u64) << TRIE_BITS | i as u64
        }));
        let need = budget + 1;
        if self.order.len() > need {
            self.order.select_nth_unstable(need - 1);
            let last = self.order[need - 1] >> TRIE_BITS;
            let mut end = need;
            for i in need..self.order.len() {
                if self.order[i] >> TRIE_BITS == last {
                    self.order.swap(end, i);
                    end += 1;
                }
            }
            self.order.truncate(end);
        }
        self.order.sort_unstable();
        self.placed.clear();
        self.placed.resize(self.trie.len(), -1);
        let mut i = 0;
        while i < self.order.len() {
            let key = self.order[i] >> TRIE_BITS;
            let mut j = i + 1;
            while j < self.order.len() && self.order[j] >> TRIE_BITS == key {
                j += 1;
            }
            self.group.clear();
            for &k in &self.order[i..j] {
                let node = (k & ((1 << TRIE_BITS) - 1)) as u32;
                let parent = self.trie[node as usize].parent;
                let at = if parent == NO_PARENT { -1 } else { self.placed[parent as usize] };
                self.group.push((((at + 1) as u64) << 32 | self.trie[node as usize].token as u64, node));
            }
            self.group.sort_unstable();
            for &(sort_key, node) in &self.group {
                let t = self.trie[node as usize];
                if tree.tokens.len() == budget {
                    tree.cut_count = t.count as u64;
                    return;
                }
                self.placed[node as usize] = tree.tokens.len() as i32;
                tree.tokens.push(t.token);
                tree.parents.push((sort_key >> 32) as i32 - 1);
                tree.counts.push(t.count as u64);
            }
            i = j;
        }
        // Every node of count 2 or more is placed; then the count-1 nodes, depth by depth: the
        // heads of that depth and the next node of each chain placed at the depth before.
        self.singles.clear();
        let mut h = 0;
        for c in 0..width {
            self.group.clear();
            for &(r, at) in &self.singles {
                let token = cell(r, c);
                if token != ROW_END {
                    self.group.push((((at + 1) as u64) << 32 | token as u64, r));
                }
            }
            while h < self.heads.len() && self.heads[h].0 as usize == c + 1 {
                let (_, parent, r) = self.heads[h];
                let at = if parent == NO_PARENT { -1 } else { self.placed[parent as usize] };
                self.group.push((((at + 1) as u64) << 32 | cell(r, c) as u64, r));
                h += 1;
            }
            if self.group.is_empty() && h == self.heads.len() {
                break;
            }
            self.group.sort_unstable();
            self.singles.clear();
            for &(sort_key, r) in &self.group {
                if tree.tokens.len() == budget {
                    tree.cut_count = 1;
                    return;
                }
                self.singles.push((r, tree.tokens.len() as i32));
                tree.tokens.push(sort_key as u32);
                tree.parents.push((sort_key >> 32) as i32 - 1);
                tree.counts.push(1);
            }
        }
    }
}

/// One tree's growth: the searcher's buffers and what the expansions need to know.
struct Growth<'s, 'v, 'a> {
    s: &'s mut Searcher,
    views: &'v [ShardView<'a>],
    match_length: usize,
    limits: &'v Limits,
}

impl Growth<'_, '_, '_> {
    /// Finds the children of `node` (at `depth`; 0 = the matched suffix), except the tokens of
    /// `pushed`, and pushes the best of them (and a pending entry for what sampling left open).
    ///
    /// `room`: how many nodes the tree may still take. Only the best `room + 1` children are
    /// kept: no more than `room` of them can be added, and the next is the best one the budget
    /// leaves out (`Tree::cut_count`), whatever the other families hold.
    fn expand(&mut self, node: Node, depth: u32, parent: i32, pushed: (u32, u32), refine: u32, room: usize) {
        if depth as usize >= self.limits.max_depth {
            return;
        }
        let family = self.s.children.len();
        match node {
            Node::Rows { block, lo, hi } => self.split_rows(block, lo, hi, depth),
            Node::Sa { start, n } => {
                let spans = start as usize..(start + n) as usize;
                let total: u64 = self.s.node_spans[spans.clone()].iter().map(Span::len).sum();
                if refine == 1 && total <= DENSE_LIMIT {
                    let block = self.copy_rows(spans, depth);
                    let rows = ((self.s.rows.len() - self.s.blocks[block as usize].start)
                        / self.s.blocks[block as usize].width as usize) as u32;
                    self.split_rows(block, 0, rows, depth);
                } else {
                    self.split_spans(spans, depth, parent, pushed, refine);
                }
            }
        }
        let children = &mut self.s.children[family..];
        if children.is_empty() {
            return;
        }
        if children.len() > 1 {
            let order = |c: &Child| (Reverse(c.count), c.token);
            let keep = room + 1;
            if children.len() > keep {
                children.select_nth_unstable_by_key(keep - 1, order);
                self.s.children.truncate(family + keep);
            }
            self.s.children[family..].sort_unstable_by_key(order);
        }
        let children = &self.s.children[family..];
        let best = children[0];
        let end = self.s.children.len() as u32;
        self.s.heap.push(Entry::new(best.count, false, depth + 1, parent, best.token, family as u32, end));
    }

    /// Copies the continuations of the occurrences in `node_spans[spans]` (a node at `depth`)
    /// into a new block, rows in suffix-array order; returns the block.
    fn copy_rows(&mut self, spans: std::ops::Range<usize>, depth: u32) -> u32 {
        let s = &mut *self.s;
        let width = (self.limits.max_depth as u32 - depth) as usize;
        let offset = self.match_length + depth as usize;
        let several = spans.len() > 1;
        let start = s.rows.len();
        let out = if several { &mut s.unsorted_rows } else { &mut s.rows };
        if several {
            out.clear();
        }
        let total: u64 = s.node_spans[spans.clone()].iter().map(Span::len).sum();
        let mut row = out.len();
        out.resize(row + total as usize * width, ROW_END);
        for span in &s.node_spans[spans] {
            let v = &self.views[span.shard as usize];
            for i in span.lo..span.hi {
                let cells = &mut out[row..row + width];
                row += width;
                let Some(&pos) = v.sa.get(i as usize) else { continue };
                let at = pos as usize + offset;
                match v.text {
                    Text::U16(text) => fill_row(cells, text.get(at..).unwrap_or_default(), v.separator),
                    Text::U32(text) => fill_row(cells, text.get(at..).unwrap_or_default(), v.separator),
                }
            }
        }
        if several {
            // Each shard's rows are sorted; the merged order is the suffix array's order over
            // the continuations (ROW_END sorts after every token, as a separator does).
            let n = s.unsorted_rows.len() / width;
            s.row_order.clear();
            s.row_order.extend(0..n as u32);
            let rows = &s.unsorted_rows;
            let row = |r: u32| &rows[r as usize * width..(r as usize + 1) * width];
            s.row_order.sort_by(|&a, &b| row(a).cmp(row(b)));
            for &r in &s.row_order {
                s.rows.extend_from_slice(row(r));
            }
        }
        s.blocks.push(Block { start, width: width as u32, depth });
        (s.blocks.len() - 1) as u32
    }

    /// The children of rows `lo..hi` of `block`, for a node at `depth`.
    fn split_rows(&mut self, block: u32, lo: u32, hi: u32, depth: u32) {
        let s = &mut *self.s;
        let b = s.blocks[block as usize];
        let (width, column) = (b.width as usize, (depth - b.depth) as usize);
        let cell = |r: u32| s.rows[b.start + r as usize * width + column];
        let mut r = lo;
        while r < hi {
            let token = cell(r);
            if token == ROW_END {
                break; // ended rows sort last
            }
            let mut end = r + 1;
            while end < hi && cell(end) == token {
                end += 1;
            }
            s.children.push(Child { token, count: (end - r) as u64, node: Node::Rows { block, lo: r, hi: end } });
            r = end;
        }
    }

    /// The children of the intervals `node_spans[spans]` at `depth`, split in the suffix array.
    ///
    /// An interval much larger than the budget is split by sampling (finer with each `refine`),
    /// which finds every child above a bound, and a pending entry with that bound stands for the
    /// rest; popped, it expands again `REFINE_FACTOR` times finer, down to a full enumeration.
    /// So a large interval is only enumerated as far as the best-first order needs.
    fn split_spans(&mut self, spans: std::ops::Range<usize>, depth: u32, parent: i32, pushed: (u32, u32), refine: u32) {
        let s = &mut *self.s;
        let offset = self.match_length + depth as usize;
        let mut runs = std::mem::take(&mut s.runs);
        runs.clear();
        let mut missed_bound = 0u64;
        s.sampled.clear();
        let samples = (SAMPLES_PER_BUDGET * (self.limits.budget as u32).max(1)).saturating_mul(refine);
        for span in &s.node_spans[spans.clone()] {
            let v = &self.views[span.shard as usize];
            let stride = (span.hi - span.lo) / samples;
            let sample = stride > 1 && span.hi - span.lo > SCAN_LIMIT;
            if sample {
                missed_bound += sampled_runs(v, *span, offset, stride, &mut runs);
            } else {
                all_runs(v, *span, offset, &mut runs);
            }
            s.sampled.push(sample);
        }
        if missed_bound > 0 && spans.len() > 1 {
            // A token found in one shard may have been skipped by sampling in another: take its
            // exact run in every sampled shard so that the merged counts are exact.
            s.tokens.clear();
            s.tokens.extend(runs.iter().map(|r| r.0));
            s.tokens.sort_unstable();
            s.tokens.dedup();
            let node_spans = &s.node_spans[spans.clone()];
            let sampled = &s.sampled;
            let was_sampled = |shard: u32| node_spans.iter().zip(sampled).any(|(sp, &x)| x && sp.shard == shard);
            runs.retain(|r| !was_sampled(r.1.shard));
            for (span, &x) in node_spans.iter().zip(sampled) {
                if x {
                    exact_runs_of(&self.views[span.shard as usize], *span, offset, &s.tokens, &mut runs);
                }
            }
        }
        if spans.len() > 1 {
            // One shard's runs come in token order already; several shards' are merged by token.
            runs.sort_unstable_by_key(|r| (r.0, r.1.shard));
        }
        let already = pushed.0 as usize..(pushed.0 + pushed.1) as usize;
        let pushed_start = s.pushed.len();
        if missed_bound > 0 {
            // A pending entry needs every token found under this node so far.
            s.pushed.extend_from_within(already.clone());
        }
        for group in runs.chunk_by(|a, b| a.0 == b.0) {
            let token = group[0].0;
            // `pushed` is sorted (see below): a completion of a huge interval checks thousands
            // of tokens against thousands of pushed ones.
            if s.pushed[already.clone()].binary_search(&token).is_ok() {
                continue;
            }
            if missed_bound > 0 {
                s.pushed.push(token);
            }
            let start = s.node_spans.len() as u32;
            s.node_spans.extend(group.iter().map(|r| r.1));
            let count = group.iter().map(|r| r.1.len()).sum();
            s.children.push(Child { token, count, node: Node::Sa { start, n: group.len() as u32 } });
        }
        s.runs = runs;
        if missed_bound > 0 {
            s.pushed[pushed_start..].sort_unstable();
            let copy = s.node_spans.len() as u32;
            s.node_spans.extend_from_within(spans.clone());
            s.pendings.push(Pending {
                spans: (copy, spans.len() as u32),
                pushed: (pushed_start as u32, (s.pushed.len() - pushed_start) as u32),
                refine: refine.saturating_mul(REFINE_FACTOR),
            });
            s.heap.push(Entry::new(missed_bound, true, depth + 1, parent, 0, (s.pendings.len() - 1) as u32, 0));
        }
    }
}
