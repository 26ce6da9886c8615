//! The original REST drafting policy, reproduced so that benchmarks can compare policies on the
//! same datastore.
//!
//! 1. The longest suffix of `max_span` down to `min_span` tokens that occurs (the same length as
//!    the exact policy finds).
//! 2. Its first `REST_MAX_OCCURRENCES` occurrences in suffix-array order (shards in order), each
//!    followed for `max_depth` tokens (stopping at a document boundary).
//! 3. Every prefix of those continuations counted; the `budget` most frequent kept
//!    (ties: shorter first, then lexicographically smaller).
//! 4. The final cut: while the kept prefixes' distinct-token counts sum to more than `budget`,
//!    drop the prefix with the most distinct tokens (ties: the earlier in step 3's order, as the
//!    original code's stable sort does).
//! 5. The tree is every prefix of the remaining paths, ordered by (count desc, depth asc,
//!    lexicographic path).
//!
//! The prefixes are counted in a trie (one node per distinct prefix, found by its parent and
//! token), so memory grows with occurrences x depth, not with occurrences x depth squared as a
//! map from every prefix's token vector would; a path is only spelled out for the few nodes that
//! are kept.

use crate::cancel::Cancel;
use crate::search::{longest_match, Limits, Span, Tree};
use crate::shard::ShardView;
use std::cmp::Ordering;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

pub const REST_MAX_OCCURRENCES: usize = 5_000;
/// The occurrence walk asks whether it is cancelled once per this many occurrences (at most
/// 16 x max_depth trie steps between two looks: well under a millisecond).
const CANCEL_CHECK_EVERY: usize = 16;

pub fn rest_tree(views: &[ShardView], context: &[u32], limits: &Limits) -> Tree {
    rest_tree_until(views, context, limits, &Cancel::never()).expect("never cancelled")
}

/// `rest_tree`, given up (`None`) once `cancel` says so.
pub fn rest_tree_until(views: &[ShardView], context: &[u32], limits: &Limits, cancel: &Cancel) -> Option<Tree> {
    let (match_length, spans) = longest_match(views, context, limits);
    let occurrences: u64 = spans.iter().map(Span::len).sum();
    let mut tree = Tree { match_length: match_length as u32, occurrences, ..Tree::default() };
    if match_length == 0 || limits.budget == 0 {
        return Some(tree);
    }
    let trie = count_prefixes(views, &spans, match_length, limits.max_depth, cancel)?;
    if cancel.is_cancelled() {
        return None;
    }
    let ranked = trie.most_frequent(limits.budget);
    if cancel.is_cancelled() {
        return None;
    }
    let kept = distinct_token_cut(&trie, &ranked, limits.budget);

    // Close the kept paths under prefixes and order the nodes so that parents come first.
    let mut nodes: Vec<u32> = Vec::new();
    let mut index: HashMap<u32, i32, FastHash> = HashMap::default();
    for &node in &kept {
        let mut n = node;
        while n != ROOT && !index.contains_key(&n) {
            index.insert(n, 0);
            nodes.push(n);
            n = trie.nodes[n as usize].parent;
        }
    }
    nodes.sort_unstable_by(|&a, &b| trie.rank_order(a, b));
    for (i, &n) in nodes.iter().enumerate() {
        index.insert(n, i as i32);
    }
    for &n in &nodes {
        let node = &trie.nodes[n as usize];
        tree.tokens.push(node.token);
        tree.parents.push(if node.parent == ROOT { -1 } else { index[&node.parent] });
        tree.counts.push(node.count as u64);
    }
    Some(tree)
}

/// The parent of the depth-1 nodes.
const ROOT: u32 = u32::MAX;

/// One distinct prefix: its last token, the prefix one shorter, and how many of the walked
/// continuations start with it.
struct Node {
    token: u32,
    parent: u32,
    count: u32,
    depth: u32,
}

/// A multiplicative hash for the trie's integer keys (the standard SipHash costs several times
/// more, and these keys come from the datastore, not from a client who could choose collisions
/// beyond the search's own bounded work).
#[derive(Default)]
struct IntHasher(u64);

impl Hasher for IntHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(b as u64);
        }
    }
    fn write_u32(&mut self, x: u32) {
        self.write_u64(x as u64);
    }
    fn write_u64(&mut self, x: u64) {
        self.0 = (self.0 ^ x).wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(29);
    }
}

type FastHash = BuildHasherDefault<IntHasher>;

struct Trie {
    nodes: Vec<Node>,
    /// (parent, token) -> child node.
    children: HashMap<u64, u32, FastHash>,
}

impl Trie {
    fn child(&mut self, parent: u32, token: u32, depth: u32) -> u32 {
        let next = self.nodes.len() as u32;
        let node = *self.children.entry(((parent as u64) << 32) | token as u64).or_insert(next);
        if node == next {
            self.nodes.push(Node { token, parent, count: 0, depth });
        }
        node
    }

    /// Lexicographic order of the paths to `a` and `b`, which have the same depth: walk up both
    /// until they share a parent, then compare the tokens there.
    fn lex_order_same_depth(&self, mut a: u32, mut b: u32) -> Ordering {
        let mut order = Ordering::Equal;
        while a != b {
            let (na, nb) = (&self.nodes[a as usize], &self.nodes[b as usize]);
            order = na.token.cmp(&nb.token); // the last one compared is the closest to the root
            a = na.parent;
            b = nb.parent;
        }
        order
    }

    /// Step 3's order: count desc, depth asc, then lexicographic path.
    fn rank_order(&self, a: u32, b: u32) -> Ordering {
        let (na, nb) = (&self.nodes[a as usize], &self.nodes[b as usize]);
        nb.count
            .cmp(&na.count)
            .then(na.depth.cmp(&nb.depth))
            .then_with(|| self.lex_order_same_depth(a, b))
    }

    /// The `budget` first nodes in `rank_order`, in that order. Only the group of nodes tied
    /// with the last one kept (same count and depth, so at most one per occurrence) is ordered
    /// by path.
    fn most_frequent(&self, budget: usize) -> Vec<u32> {
        let mut all: Vec<u32> = (0..self.nodes.len() as u32).collect();
        let coarse = |n: &u32| {
            let node = &self.nodes[*n as usize];
            (std::cmp::Reverse(node.count), node.depth)
        };
        if all.len() > budget {
            all.select_nth_unstable_by_key(budget - 1, coarse);
            let boundary = coarse(&all[budget - 1]);
            let mut ranked: Vec<u32> = all[..budget].iter().copied().filter(|n| coarse(n) < boundary).collect();
            let mut tied: Vec<u32> = all.iter().copied().filter(|n| coarse(n) == boundary).collect();
            tied.sort_unstable_by(|&a, &b| self.lex_order_same_depth(a, b));
            tied.truncate(budget - ranked.len());
            ranked.extend(tied);
            all = ranked;
        }
        all.sort_unstable_by(|&a, &b| self.rank_order(a, b));
        all
    }

    /// How many distinct tokens the path to `node` holds.
    fn distinct_tokens(&self, mut node: u32, scratch: &mut Vec<u32>) -> usize {
        scratch.clear();
        while node != ROOT {
            let n = &self.nodes[node as usize];
            scratch.push(n.token);
            node = n.parent;
        }
        scratch.sort_unstable();
        scratch.dedup();
        scratch.len()
    }
}

/// Counts every prefix of the continuations of the first `REST_MAX_OCCURRENCES` occurrences.
fn count_prefixes(
    views: &[ShardView],
    spans: &[Span],
    match_length: usize,
    max_depth: usize,
    cancel: &Cancel,
) -> Option<Trie> {
    // Sized for the most nodes the walk can make, so that it never stops to grow the map (a
    // rehash of a million entries would be a pause without cancellation checks).
    let walked: u64 = spans.iter().map(Span::len).sum::<u64>().min(REST_MAX_OCCURRENCES as u64);
    let most_nodes = (walked as usize).saturating_mul(max_depth).min(REST_MAX_OCCURRENCES * 256);
    let mut trie = Trie {
        nodes: Vec::with_capacity(most_nodes),
        children: HashMap::with_capacity_and_hasher(most_nodes, FastHash::default()),
    };
    let mut taken = 0;
    'shards: for span in spans {
        let v = &views[span.shard as usize];
        for i in span.lo..span.hi {
            if taken == REST_MAX_OCCURRENCES {
                break 'shards;
            }
            if taken % CANCEL_CHECK_EVERY == 0 && cancel.is_cancelled() {
                return None;
            }
            taken += 1;
            let Some(&pos) = v.sa.get(i as usize) else { continue };
            let start = pos as usize + match_length;
            let mut node = ROOT;
            for k in 0..max_depth {
                match v.text.get(start + k) {
                    Some(t) if t != v.separator => {
                        node = trie.child(node, t, k as u32 + 1);
                        trie.nodes[node as usize].count += 1;
                    }
                    _ => break,
                }
            }
        }
    }
    Some(trie)
}

/// REST's final cut: drop the paths with the most distinct tokens until the sum of the paths'
/// distinct-token counts is at most `budget`.
fn distinct_token_cut(trie: &Trie, ranked: &[u32], budget: usize) -> Vec<u32> {
    let mut scratch = Vec::new();
    let mut order: Vec<(usize, usize)> =
        ranked.iter().enumerate().map(|(i, &n)| (trie.distinct_tokens(n, &mut scratch), i)).collect();
    let mut total: usize = order.iter().map(|o| o.0).sum();
    // Most distinct first; among equals the earlier ranked (more frequent) first, as the original
    // code's stable sort of the ranked list does.
    order.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    let mut dropped = vec![false; ranked.len()];
    for (d, i) in order {
        if total <= budget {
            break;
        }
        total -= d;
        dropped[i] = true;
    }
    ranked.iter().zip(dropped).filter(|(_, d)| !d).map(|(&n, _)| n).collect()
}
