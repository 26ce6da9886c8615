//! The scorer: a step's levels merged into one trie, scored by chain back-off, cut to a budget.
//!
//! The rules are those of `decoder.draft_tree.DraftTree.from_levels` (the reference):
//!
//! - Levels are taken longest match first (ties: in the order given). Their paths are merged into
//!   one trie, identical paths once, nodes numbered as first met: parents before children. A token
//!   outside `0..vocab_size` (without a vocabulary: `0..2^31`) is dropped with what follows it.
//! - score(node) = score(parent) x P(node's token | context + parent's path). At a parent, the
//!   levels that list a child there are taken longest match first; one in which the parent's path
//!   follows the suffix `n` times takes the share `n / (n + trust)` of what longer levels left and
//!   hands it to the children by count / n. The conditional is capped at 1, so scores never grow
//!   along a path.
//! - The budget keeps the best nodes: by score, then shallower, then earlier. A parent always ranks
//!   before its children, so the kept nodes form a tree.

use rustc_hash::FxHashMap;
use std::cmp::Ordering;

/// One source's counted continuations of one matched suffix of the context.
#[derive(Clone, Debug)]
pub struct Level<'a> {
    /// The matched suffix's length in tokens.
    pub match_length: u32,
    /// How many times the suffix occurs with at least one token after it.
    pub occurrences: f64,
    /// How many occurrences make the level half believed.
    pub trust: f64,
    pub counts: LevelCounts<'a>,
}

/// How a level's counts are given.
#[derive(Clone, Debug)]
pub enum LevelCounts<'a> {
    /// A counted trie (the datastore's answer): parents before children, -1 for a child of the
    /// root, `counts[i]` occurrences continuing with node `i`'s path.
    Trie { tokens: &'a [i64], parents: &'a [i64], counts: &'a [f64] },
    /// One continuation per occurrence (the n-gram sources); a row ends at its first token outside
    /// the vocabulary (a negative separator, for instance) or at its end.
    Rows(Vec<&'a [i64]>),
}

impl Level<'_> {
    fn is_empty(&self) -> bool {
        match &self.counts {
            LevelCounts::Trie { tokens, .. } => tokens.is_empty(),
            LevelCounts::Rows(rows) => rows.is_empty() || rows.iter().all(|r| r.is_empty()),
        }
    }
}

/// A scored draft tree: node `i` holds `tokens[i]`, `parents[i]` (-1: a child of the root) and
/// `scores[i]`, the estimated probability that the model produces its whole path.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DraftTree {
    pub tokens: Vec<u32>,
    pub parents: Vec<i32>,
    pub scores: Vec<f64>,
}

impl DraftTree {
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
}

/// Why a set of levels cannot be scored.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ScoreError {
    /// A trie level's parent is not -1 or an earlier node.
    #[error("a Level's trie has a parent that is not -1 or an earlier node")]
    BadParent,
    /// A trie level's tokens, parents and counts differ in length.
    #[error("a Level's trie needs as many parents and counts as tokens")]
    Ragged,
    /// A negative or non-finite trust or occurrence count.
    #[error("a Level's trust and occurrences must be >= 0")]
    Negative,
}

/// The scorer's working memory, kept between steps so that a step allocates nothing new once
/// the largest tree has been seen.
#[derive(Default)]
pub struct Scorer {
    index: FxHashMap<(i32, u32), u32>,
    tokens: Vec<u32>,
    parents: Vec<i32>,
    /// counts[node * n_levels + level]
    counts: Vec<f64>,
    merged: Vec<i32>,
    per_count: Vec<f64>,
    order: Vec<usize>,
    depth: Vec<u32>,
}

/// A node dropped with its token (outside the vocabulary) or an ancestor's.
const DROPPED: i32 = -2;

impl Scorer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Every level's paths in one trie, scored, and the `budget` best nodes kept (all when None).
    pub fn score(&mut self, levels: &[Level], budget: Option<usize>, vocab_size: Option<u64>) -> Result<DraftTree, ScoreError> {
        for level in levels {
            if !(level.trust >= 0.0 && level.occurrences >= 0.0) {
                return Err(ScoreError::Negative);
            }
            if let LevelCounts::Trie { tokens, parents, counts } = &level.counts {
                if tokens.len() != parents.len() || tokens.len() != counts.len() {
                    return Err(ScoreError::Ragged);
                }
            }
        }
        self.order.clear();
        self.order.extend((0..levels.len()).filter(|&i| !levels[i].is_empty()));
        if self.order.is_empty() {
            return Ok(DraftTree::default());
        }
        // Longest match first; a stable sort keeps the given order among equals.
        self.order.sort_by_key(|&i| std::cmp::Reverse(levels[i].match_length));
        let order = std::mem::take(&mut self.order);
        let result = self.merge(levels, &order, vocab_size).map(|()| self.chain_scores(levels, &order, budget));
        self.order = order;
        result
    }

    /// The merged trie of the levels in `order`: `tokens`, `parents` and `counts`.
    fn merge(&mut self, levels: &[Level], order: &[usize], vocab_size: Option<u64>) -> Result<(), ScoreError> {
        let limit = vocab_size.map_or(1u64 << 31, |v| v.min(1 << 31)) as i64;
        let valid = |token: i64| (0..limit).contains(&token);
        let n_levels = order.len();
        self.index.clear();
        self.tokens.clear();
        self.parents.clear();
        self.counts.clear();
        for (number, &l) in order.iter().enumerate() {
            match &levels[l].counts {
                LevelCounts::Trie { tokens, parents, counts } => {
                    self.merged.clear();
                    for (i, (&token, &parent)) in tokens.iter().zip(parents.iter()).enumerate() {
                        if parent < -1 || parent >= i as i64 {
                            return Err(ScoreError::BadParent);
                        }
                        let above = if parent < 0 { -1 } else { self.merged[parent as usize] };
                        if above == DROPPED || !valid(token) {
                            self.merged.push(DROPPED);
                            continue;
                        }
                        let node = self.node(above, token as u32, n_levels);
                        self.counts[node as usize * n_levels + number] += counts[i];
                        self.merged.push(node as i32);
                    }
                }
                LevelCounts::Rows(rows) => {
                    for row in rows {
                        let mut above = -1i32;
                        for &token in row.iter() {
                            if !valid(token) {
                                break;
                            }
                            let node = self.node(above, token as u32, n_levels);
                            self.counts[node as usize * n_levels + number] += 1.0;
                            above = node as i32;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// The node `(parent, token)`, made (with zero counts) when it is new.
    #[inline]
    fn node(&mut self, parent: i32, token: u32, n_levels: usize) -> u32 {
        let next = self.tokens.len() as u32;
        let node = *self.index.entry((parent, token)).or_insert(next);
        if node == next {
            self.tokens.push(token);
            self.parents.push(parent);
            self.counts.resize(self.counts.len() + n_levels, 0.0);
        }
        node
    }

    /// Chain back-off scores of the merged trie, then the budget cut.
    fn chain_scores(&mut self, levels: &[Level], order: &[usize], budget: Option<usize>) -> DraftTree {
        let n_levels = order.len();
        let n_nodes = self.tokens.len();
        // Row p of n (p = parent + 1, 0 for the root): how often each level's suffix is
        // followed by p's path. lists_a_child: whether each level lists a child of p.
        let n_at = |p: usize, l: usize, counts: &[f64]| {
            if p == 0 {
                levels[order[l]].occurrences
            } else {
                counts[(p - 1) * n_levels + l]
            }
        };
        let mut lists_a_child = vec![false; (n_nodes + 1) * n_levels];
        for i in 0..n_nodes {
            let p = (self.parents[i] + 1) as usize;
            for l in 0..n_levels {
                if self.counts[i * n_levels + l] > 0.0 {
                    lists_a_child[p * n_levels + l] = true;
                }
            }
        }
        // per_count[p, l]: the mass level l hands each count at p (what longer levels left,
        // times its share, over n).
        self.per_count.clear();
        self.per_count.resize((n_nodes + 1) * n_levels, 0.0);
        for p in 0..=n_nodes {
            let mut left = 1.0f64;
            for l in 0..n_levels {
                let n = n_at(p, l, &self.counts);
                let active = lists_a_child[p * n_levels + l] && n > 0.0;
                let share = if active { n / (n + levels[order[l]].trust) } else { 0.0 };
                if active {
                    self.per_count[p * n_levels + l] = left * share / n;
                }
                left *= 1.0 - share;
            }
        }
        let mut scores = Vec::with_capacity(n_nodes);
        self.depth.clear();
        for i in 0..n_nodes {
            let p = (self.parents[i] + 1) as usize;
            let mut conditional = 0.0f64;
            for l in 0..n_levels {
                conditional += self.per_count[p * n_levels + l] * self.counts[i * n_levels + l];
            }
            let conditional = conditional.min(1.0);
            let parent = self.parents[i];
            if parent >= 0 {
                scores.push(conditional * scores[parent as usize]);
                self.depth.push(self.depth[parent as usize] + 1);
            } else {
                scores.push(conditional);
                self.depth.push(1);
            }
        }
        let tree = DraftTree { tokens: self.tokens.clone(), parents: self.parents.clone(), scores };
        match budget {
            Some(budget) if budget < n_nodes => best_subtree(&tree, &self.depth, budget),
            _ => tree,
        }
    }
}

/// The `budget` best nodes of `tree` (by score, then shallower, then earlier), as a tree.
pub fn best_subtree(tree: &DraftTree, depth: &[u32], budget: usize) -> DraftTree {
    let mut ranking: Vec<usize> = (0..tree.len()).collect();
    let key = |&a: &usize, &b: &usize| -> Ordering {
        tree.scores[b]
            .partial_cmp(&tree.scores[a])
            .unwrap_or(Ordering::Equal)
            .then(depth[a].cmp(&depth[b]))
            .then(a.cmp(&b))
    };
    if budget < ranking.len() {
        ranking.select_nth_unstable_by(budget, key);
        ranking.truncate(budget);
    }
    ranking.sort_unstable();
    let mut new_number = vec![-1i32; tree.len()];
    let mut out = DraftTree::default();
    for (new, &old) in ranking.iter().enumerate() {
        new_number[old] = new as i32;
        let parent = tree.parents[old];
        out.tokens.push(tree.tokens[old]);
        out.parents.push(if parent >= 0 { new_number[parent as usize] } else { -1 });
        out.scores.push(tree.scores[old]);
    }
    out
}

/// Depth of each node of a tree whose parents come first (1 for a child of the root).
pub fn depths(parents: &[i32]) -> Vec<u32> {
    let mut depth: Vec<u32> = Vec::with_capacity(parents.len());
    for &p in parents {
        depth.push(if p < 0 { 1 } else { depth[p as usize] + 1 });
    }
    depth
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trie<'a>(m: u32, occ: f64, trust: f64, tokens: &'a [i64], parents: &'a [i64], counts: &'a [f64]) -> Level<'a> {
        Level { match_length: m, occurrences: occ, trust, counts: LevelCounts::Trie { tokens, parents, counts } }
    }

    #[test]
    fn one_level_hands_its_share_by_count() {
        // 4 occurrences, 3 continue with 7 (then 2 with 8), 1 with 9; trust 4: share 1/2 at the
        // root, 3/7 under 7 (3 occurrences of the path 7).
        let level = trie(3, 4.0, 4.0, &[7, 8, 9], &[-1, 0, -1], &[3.0, 2.0, 1.0]);
        let tree = Scorer::new().score(&[level], None, None).unwrap();
        assert_eq!(tree.tokens, vec![7, 8, 9]);
        assert_eq!(tree.parents, vec![-1, 0, -1]);
        let want = [0.5 * 3.0 / 4.0, 0.5 * 3.0 / 4.0 * (3.0 / 7.0 * 2.0 / 3.0), 0.5 / 4.0];
        for (got, want) in tree.scores.iter().zip(want) {
            assert!((got - want).abs() < 1e-12, "{got} vs {want}");
        }
    }

    #[test]
    fn longer_matches_take_their_share_first() {
        let long = trie(5, 1.0, 1.0, &[7], &[-1], &[1.0]);
        let short = trie(2, 4.0, 0.0, &[9, 7], &[-1, -1], &[3.0, 1.0]);
        // Given short first: the order given does not matter, the match length does.
        let tree = Scorer::new().score(&[short, long], None, None).unwrap();
        // Node order: the longer level's paths are met first.
        assert_eq!(tree.tokens, vec![7, 9]);
        // 7: 1/2 from the long level, then 1/2 x 1/4 from the short one; 9: 1/2 x 3/4.
        assert!((tree.scores[0] - (0.5 + 0.125)).abs() < 1e-12);
        assert!((tree.scores[1] - 0.375).abs() < 1e-12);
    }

    #[test]
    fn rows_count_one_per_occurrence_and_stop_at_a_separator() {
        let rows: Vec<&[i64]> = vec![&[4, 5, -1, 6], &[4, 6], &[4, 5, 7]];
        let level = Level { match_length: 2, occurrences: 3.0, trust: 1.0, counts: LevelCounts::Rows(rows) };
        let tree = Scorer::new().score(&[level], None, None).unwrap();
        assert_eq!(tree.tokens, vec![4, 5, 6, 7]);
        assert_eq!(tree.parents, vec![-1, 0, 0, 1]);
    }

    #[test]
    fn tokens_outside_the_vocabulary_are_dropped_with_their_subtree() {
        let level = trie(2, 3.0, 1.0, &[3, 50, 4, 5], &[-1, -1, 1, 0], &[2.0, 1.0, 1.0, 1.0]);
        let tree = Scorer::new().score(&[level], None, Some(10)).unwrap();
        assert_eq!(tree.tokens, vec![3, 5]);
        assert_eq!(tree.parents, vec![-1, 0]);
    }

    #[test]
    fn the_budget_keeps_the_best_nodes_as_a_tree() {
        let level = trie(2, 10.0, 0.0, &[1, 2, 3, 4], &[-1, 0, -1, 1], &[6.0, 5.0, 4.0, 5.0]);
        let tree = Scorer::new().score(&[level], Some(3), None).unwrap();
        // scores: 1: .6, 1 2: .5, 3: .4, 1 2 4: .5 (ties: shallower first).
        assert_eq!(tree.tokens, vec![1, 2, 4]);
        assert_eq!(tree.parents, vec![-1, 0, 1]);
    }

    #[test]
    fn a_parent_after_its_child_is_refused() {
        let level = trie(2, 1.0, 1.0, &[1, 2], &[1, -1], &[1.0, 1.0]);
        assert_eq!(Scorer::new().score(&[level], None, None), Err(ScoreError::BadParent));
    }
}
