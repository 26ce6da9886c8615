//! The REST policy's counted trie against the plain definition: a map from every prefix's token
//! vector to its count (the implementation it replaced, kept here as the reference).

use rest_retriever::{BuildOptions, Builder, Datastore, Policy, Query, Tree};
use std::collections::HashMap;

const MAX_OCCURRENCES: usize = 5_000;

/// The REST policy written out from its definition (see `rest_policy.rs`), over whole documents.
fn reference(docs: &[Vec<i64>], context: &[i64], q: &Query) -> Tree {
    let occurs = |pattern: &[i64]| docs.iter().any(|d| d.windows(pattern.len()).any(|w| w == pattern));
    let mut match_length = 0;
    for len in (q.min_span..=q.max_span.min(context.len())).rev() {
        if occurs(&context[context.len() - len..]) {
            match_length = len;
            break;
        }
    }
    let mut tree = Tree::default();
    if match_length == 0 {
        return tree;
    }
    let pattern = &context[context.len() - match_length..];
    // Occurrences in suffix-array order: sorted by the suffix that starts there (a document end
    // sorts after every token).
    let mut starts: Vec<(usize, usize)> = Vec::new();
    for (d, doc) in docs.iter().enumerate() {
        for i in 0..doc.len() {
            if doc[i..].starts_with(pattern) {
                starts.push((d, i));
            }
        }
    }
    let key = |&(d, i): &(usize, usize)| {
        let mut k: Vec<u64> = docs[d][i..].iter().map(|&t| t as u64).collect();
        k.push(u64::MAX);
        (k, d, i)
    };
    starts.sort_by_key(key);
    tree.match_length = match_length as u32;
    tree.occurrences = starts.len() as u64;
    if q.budget == 0 {
        return tree;
    }
    let mut counts: HashMap<Vec<u32>, u64> = HashMap::new();
    for &(d, i) in starts.iter().take(MAX_OCCURRENCES) {
        let cont = &docs[d][i + match_length..];
        for len in 1..=cont.len().min(q.max_depth) {
            *counts.entry(cont[..len].iter().map(|&t| t as u32).collect()).or_insert(0) += 1;
        }
    }
    let mut ranked: Vec<(&Vec<u32>, u64)> = counts.iter().map(|(p, &c)| (p, c)).collect();
    ranked.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.len().cmp(&b.0.len())).then(a.0.cmp(b.0)));
    ranked.truncate(q.budget);
    let distinct = |p: &Vec<u32>| {
        let mut d = p.clone();
        d.sort_unstable();
        d.dedup();
        d.len()
    };
    let mut order: Vec<(usize, usize)> = ranked.iter().enumerate().map(|(i, r)| (distinct(r.0), i)).collect();
    let mut total: usize = order.iter().map(|o| o.0).sum();
    order.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    let mut dropped = vec![false; ranked.len()];
    for (d, i) in order {
        if total <= q.budget {
            break;
        }
        total -= d;
        dropped[i] = true;
    }
    let kept: Vec<&Vec<u32>> = ranked.iter().zip(dropped).filter(|(_, d)| !d).map(|(r, _)| r.0).collect();
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

/// A small deterministic generator (no dependency needed for a few thousand draws).
struct Lcg(u64);
impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

#[test]
fn the_counted_trie_gives_the_reference_tree() {
    let tmp = tempfile::tempdir().unwrap();
    let mut rng = Lcg(7);
    for case in 0..12 {
        let alphabet = 2 + rng.below(5) as i64;
        let docs: Vec<Vec<i64>> = (0..1 + rng.below(20))
            .map(|_| (0..1 + rng.below(120)).map(|_| rng.below(alphabet as u64) as i64).collect())
            .collect();
        let shard_tokens = if case % 2 == 0 { 1 << 20 } else { 150 };
        let dir = tmp.path().join(format!("ds{case}"));
        let mut b = Builder::create(
            &dir,
            BuildOptions { vocab_size: 8, tokenizer_name: "t".into(), tokenizer_fingerprint: "f".into(), shard_tokens, ..BuildOptions::default() },
        )
        .unwrap();
        for d in &docs {
            b.add_document(d).unwrap();
        }
        b.finish().unwrap();
        let ds = Datastore::open(&dir, None).unwrap();
        for _ in 0..20 {
            let context: Vec<i64> = (0..1 + rng.below(6)).map(|_| rng.below(alphabet as u64) as i64).collect();
            let q = Query {
                min_span: 1,
                max_span: 1 + rng.below(6) as usize,
                budget: rng.below(40) as usize,
                max_depth: 1 + rng.below(12) as usize,
                policy: Policy::Rest,
            };
            let q = Query { min_span: q.min_span.min(q.max_span), ..q };
            // Across shards the walk takes occurrences shard by shard, not in global order; with
            // fewer occurrences than the walk takes, the order does not change the counts.
            assert!(docs.iter().map(|d| d.len()).sum::<usize>() < MAX_OCCURRENCES);
            let got = ds.search(&context, &q, None).unwrap();
            assert_eq!(got, reference(&docs, &context, &q), "case {case} context {context:?} {q:?}");
        }
    }
}

#[test]
fn many_occurrences_and_deep_continuations_stay_small() {
    // 6,000 occurrences of [0, 0] (more than the walk takes), each followed by a distinct
    // 200-token continuation: the old prefix map held ~5,000 x 200 vectors of ~100 tokens.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ds");
    let mut b = Builder::create(
        &dir,
        BuildOptions { vocab_size: 60_000, tokenizer_name: "t".into(), tokenizer_fingerprint: "f".into(), ..BuildOptions::default() },
    )
    .unwrap();
    let mut rng = Lcg(3);
    let docs: Vec<Vec<i64>> = (0..6_000)
        .map(|_| {
            let mut d = vec![0, 0];
            d.extend((0..200).map(|_| 1 + rng.below(59_000) as i64));
            d
        })
        .collect();
    for d in &docs {
        b.add_document(d).unwrap();
    }
    b.finish().unwrap();
    let ds = Datastore::open(&dir, None).unwrap();
    let q = Query { min_span: 2, max_span: 2, budget: 256, max_depth: 200, policy: Policy::Rest };
    let got = ds.search(&[0, 0], &q, None).unwrap();
    assert_eq!(got.occurrences, 6_000);
    let want = reference(&docs, &[0, 0], &q);
    assert_eq!(got, want);
}
