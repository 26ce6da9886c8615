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

use crate::search::{longest_match, Limits, Span, Tree};
use crate::shard::ShardView;
use std::collections::HashMap;

pub const REST_MAX_OCCURRENCES: usize = 5_000;

pub fn rest_tree(views: &[ShardView], context: &[u32], limits: &Limits) -> Tree {
    let (match_length, spans) = longest_match(views, context, limits);
    let occurrences: u64 = spans.iter().map(Span::len).sum();
    let mut tree = Tree { match_length: match_length as u32, occurrences, ..Tree::default() };
    if match_length == 0 || limits.budget == 0 {
        return tree;
    }
    let counts = count_prefixes(views, &spans, match_length, limits.max_depth);
    let mut ranked: Vec<(&Vec<u32>, u64)> = counts.iter().map(|(p, &c)| (p, c)).collect();
    ranked.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.len().cmp(&b.0.len())).then(a.0.cmp(b.0)));
    ranked.truncate(limits.budget);
    let kept = distinct_token_cut(&ranked, limits.budget);

    // Close the kept paths under prefixes and order the nodes so that parents come first.
    let mut nodes: Vec<(&[u32], u64)> = Vec::new();
    let mut seen: HashMap<&[u32], ()> = HashMap::new();
    for path in kept {
        for len in 1..=path.len() {
            let prefix = &path[..len];
            if seen.insert(prefix, ()).is_none() {
                nodes.push((prefix, counts[prefix]));
            }
        }
    }
    nodes.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.len().cmp(&b.0.len())).then(a.0.cmp(b.0)));
    let index: HashMap<&[u32], i32> = nodes.iter().enumerate().map(|(i, n)| (n.0, i as i32)).collect();
    for (path, count) in &nodes {
        tree.tokens.push(*path.last().unwrap());
        tree.parents.push(if path.len() == 1 { -1 } else { index[&path[..path.len() - 1]] });
        tree.counts.push(*count);
    }
    tree
}

/// Counts every prefix of the continuations of the first `REST_MAX_OCCURRENCES` occurrences.
fn count_prefixes(
    views: &[ShardView],
    spans: &[Span],
    match_length: usize,
    max_depth: usize,
) -> HashMap<Vec<u32>, u64> {
    let mut counts: HashMap<Vec<u32>, u64> = HashMap::new();
    let mut taken = 0;
    'shards: for span in spans {
        let v = &views[span.shard as usize];
        for i in span.lo..span.hi {
            if taken == REST_MAX_OCCURRENCES {
                break 'shards;
            }
            taken += 1;
            let start = v.sa[i as usize] as usize + match_length;
            let mut path = Vec::with_capacity(max_depth);
            for k in 0..max_depth {
                match v.text.get(start + k) {
                    Some(t) if t != v.separator => {
                        path.push(t);
                        *counts.entry(path.clone()).or_insert(0) += 1;
                    }
                    _ => break,
                }
            }
        }
    }
    counts
}

/// REST's final cut: drop the paths with the most distinct tokens until the sum of the paths'
/// distinct-token counts is at most `budget`.
fn distinct_token_cut<'a>(ranked: &[(&'a Vec<u32>, u64)], budget: usize) -> Vec<&'a Vec<u32>> {
    let distinct = |p: &Vec<u32>| {
        let mut d = p.clone();
        d.sort_unstable();
        d.dedup();
        d.len()
    };
    let mut order: Vec<(usize, usize)> = ranked.iter().enumerate().map(|(i, r)| (distinct(r.0), i)).collect();
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
    ranked.iter().zip(dropped).filter(|(_, d)| !d).map(|(r, _)| r.0).collect()
}
