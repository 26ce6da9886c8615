//! Searches against a brute-force reference (every tree node, count, cut count and back-off
//! level), and session searches against stateless ones over random decoding sessions: contexts
//! that grow by continuations of the datastore's documents (as accepted drafts do), by random
//! tokens (as rejected drafts do), and that sometimes jump elsewhere.

use rest_retriever::{BuildOptions, Builder, Cancel, Datastore, Query, SearchSession, Tree};
use std::time::{Duration, Instant};
use std::collections::{BinaryHeap, HashMap};
use std::cmp::Reverse;
use std::path::Path;

/// xorshift64*: a fixed, dependency-free random source.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn build(dir: &Path, docs: &[Vec<i64>], vocab_size: u32, shard_tokens: u64) -> Datastore {
    let opts = BuildOptions {
        vocab_size,
        tokenizer_name: "t".into(),
        tokenizer_fingerprint: "f".into(),
        shard_tokens,
        ..BuildOptions::default()
    };
    let mut b = Builder::create(dir, opts).unwrap();
    for d in docs {
        b.add_document(d).unwrap();
    }
    b.finish().unwrap();
    Datastore::open(dir, None).unwrap()
}

fn occurrences<'a>(docs: &'a [Vec<i64>], pattern: &[i64]) -> Vec<&'a [i64]> {
    let mut out = Vec::new();
    for doc in docs {
        if doc.len() >= pattern.len() {
            for i in 0..=doc.len() - pattern.len() {
                if &doc[i..i + pattern.len()] == pattern {
                    out.push(&doc[i + pattern.len()..]);
                }
            }
        }
    }
    out
}

/// The exact policy's tree by brute force: best-first by (count desc, depth, parent, token),
/// every child of every added node pushed; the cut count is the best entry left.
fn reference_tree(docs: &[Vec<i64>], context: &[i64], length: usize, q: &Query) -> Tree {
    let pattern = &context[context.len() - length..];
    let follow = occurrences(docs, pattern);
    let mut tree = Tree { match_length: length as u32, occurrences: follow.len() as u64, ..Tree::default() };
    let children = |path: &[i64]| {
        let mut counts: HashMap<i64, u64> = HashMap::new();
        for c in &follow {
            if c.len() > path.len() && c.starts_with(path) {
                *counts.entry(c[path.len()]).or_default() += 1;
            }
        }
        counts
    };
    let mut heap = BinaryHeap::new();
    for (t, n) in children(&[]) {
        heap.push((n, Reverse(1usize), Reverse(-1i32), Reverse(t), vec![t]));
    }
    while tree.tokens.len() < q.budget {
        let Some((n, Reverse(depth), Reverse(parent), Reverse(t), path)) = heap.pop() else { break };
        let index = tree.tokens.len() as i32;
        tree.tokens.push(t as u32);
        tree.parents.push(parent);
        tree.counts.push(n);
        if depth < q.max_depth {
            for (c, m) in children(&path) {
                let mut longer = path.clone();
                longer.push(c);
                heap.push((m, Reverse(depth + 1), Reverse(index), Reverse(c), longer));
            }
        }
    }
    tree.cut_count = heap.peek().map_or(0, |e| e.0);
    tree
}

fn reference_levels(docs: &[Vec<i64>], context: &[i64], q: &Query, levels: usize) -> Vec<Tree> {
    let longest = q.max_span.min(context.len());
    let first = (q.min_span..=longest)
        .rev()
        .find(|&len| !occurrences(docs, &context[context.len() - len..]).is_empty())
        .unwrap_or(0);
    if first == 0 {
        return vec![Tree::default()];
    }
    let mut trees = Vec::new();
    let mut length = first;
    while trees.len() < levels && length >= q.min_span {
        trees.push(reference_tree(docs, context, length, q));
        length -= 1;
    }
    trees
}

fn random_corpus(rng: &mut Rng, vocab: usize, docs: usize, max_len: usize) -> Vec<Vec<i64>> {
    // A few repeated phrases among random tokens: long matches and shared continuations.
    let phrases: Vec<Vec<i64>> =
        (0..4).map(|_| (0..2 + rng.below(8)).map(|_| rng.below(vocab) as i64).collect()).collect();
    (0..docs)
        .map(|_| {
            let mut doc = Vec::new();
            let len = 1 + rng.below(max_len);
            while doc.len() < len {
                if rng.below(3) == 0 {
                    doc.extend_from_slice(&phrases[rng.below(phrases.len())]);
                } else {
                    doc.push(rng.below(vocab) as i64);
                }
            }
            doc
        })
        .collect()
}

fn random_query(rng: &mut Rng) -> Query {
    let min_span = 1 + rng.below(3);
    Query {
        min_span,
        max_span: min_span + rng.below(8),
        budget: [0, 1, 2, 3, 5, 8, 16, 40][rng.below(8)],
        max_depth: 1 + rng.below(6),
        ..Query::default()
    }
}

/// A session's contexts: each the last plus accepted tokens (a document's continuation) and one
/// more token, now and then a jump to another document.
fn random_session(rng: &mut Rng, docs: &[Vec<i64>], vocab: usize, steps: usize) -> Vec<Vec<i64>> {
    let mut context: Vec<i64> = (0..1 + rng.below(4)).map(|_| rng.below(vocab) as i64).collect();
    let mut out = Vec::new();
    for _ in 0..steps {
        match rng.below(10) {
            0 => context = (0..1 + rng.below(6)).map(|_| rng.below(vocab) as i64).collect(),
            1..=5 => {
                let doc = &docs[rng.below(docs.len())];
                let start = rng.below(doc.len());
                let end = (start + 1 + rng.below(5)).min(doc.len());
                if rng.below(2) == 0 {
                    context.extend_from_slice(&doc[start..end]);
                } else {
                    // Continue where the context's last token occurs, as an accepted draft does.
                    let last = *context.last().unwrap();
                    if let Some(at) = doc.iter().position(|&t| t == last) {
                        context.extend_from_slice(&doc[at + 1..(at + 1 + rng.below(5)).min(doc.len())]);
                    }
                }
            }
            _ => context.push(rng.below(vocab) as i64),
        }
        out.push(context.clone());
    }
    out
}

#[test]
fn searches_match_the_brute_force_reference() {
    let tmp = tempfile::tempdir().unwrap();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for corpus in 0..12 {
        let vocab = 2 + rng.below(7);
        let n_docs = 1 + rng.below(10);
        let docs = random_corpus(&mut rng, vocab, n_docs, 60);
        let longest = docs.iter().map(Vec::len).max().unwrap() as u64 + 1;
        let shard_tokens = [1 << 20, longest, 2 * longest][corpus % 3];
        let ds = build(&tmp.path().join(format!("ds{corpus}")), &docs, vocab as u32, shard_tokens);
        for context in random_session(&mut rng, &docs, vocab, 60) {
            let q = random_query(&mut rng);
            let levels = 1 + rng.below(4);
            let expected = reference_levels(&docs, &context, &q, levels);
            assert_eq!(ds.search_levels(&context, &q, levels, None).unwrap(), expected, "{context:?} {q:?}");
            assert_eq!(ds.search(&context, &q, None).unwrap(), expected[0], "{context:?} {q:?}");
        }
    }
}

#[test]
fn session_searches_equal_stateless_searches() {
    let tmp = tempfile::tempdir().unwrap();
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    for corpus in 0..16 {
        let vocab = 2 + rng.below(12);
        let n_docs = 2 + rng.below(30);
        let docs = random_corpus(&mut rng, vocab, n_docs, 300);
        let shard_tokens = if corpus % 2 == 0 { 1 << 20 } else { 700 };
        let ds = build(&tmp.path().join(format!("ds{corpus}")), &docs, vocab as u32, shard_tokens);
        for _ in 0..6 {
            let mut session = SearchSession::new();
            // Decoders keep their parameters for a session; change them now and then anyway.
            let mut q = random_query(&mut rng);
            let levels = 1 + rng.below(4);
            for context in random_session(&mut rng, &docs, vocab, 80) {
                if rng.below(20) == 0 {
                    q = random_query(&mut rng);
                }
                let q = Query { budget: q.budget.max(1) * (1 + rng.below(3)), ..q.clone() };
                let expected = ds.search_levels(&context, &q, levels, None).unwrap();
                let got = session.search_levels(&ds, &context, &q, levels, None).unwrap();
                assert_eq!(got, expected, "{context:?} {q:?}");
            }
        }
    }
}

#[test]
fn searches_given_up_halfway_leave_sessions_exact() {
    // A server gives a search a short slice and asks for it again on a worker when the slice
    // runs out: the session resumes after the levels it finished. Deadlines of a few
    // microseconds give searches up at every point; some are followed by another search
    // instead (what the session kept must not answer it), and every answer is the stateless one.
    let tmp = tempfile::tempdir().unwrap();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let (mut given_up, mut asked) = (0, 0);
    for corpus in 0..8 {
        let vocab = 2 + rng.below(12);
        let n_docs = 2 + rng.below(30);
        let docs = random_corpus(&mut rng, vocab, n_docs, 300);
        let shard_tokens = if corpus % 2 == 0 { 1 << 20 } else { 700 };
        let ds = build(&tmp.path().join(format!("ds{corpus}")), &docs, vocab as u32, shard_tokens);
        for _ in 0..4 {
            let mut session = SearchSession::new();
            let mut q = random_query(&mut rng);
            let mut levels = 1 + rng.below(4);
            for context in random_session(&mut rng, &docs, vocab, 80) {
                if rng.below(20) == 0 {
                    q = random_query(&mut rng);
                    levels = 1 + rng.below(4);
                }
                let q = Query { budget: q.budget.max(1) * (1 + rng.below(3)), ..q.clone() };
                let expected = ds.search_levels(&context, &q, levels, None).unwrap();
                if rng.below(2) == 0 {
                    asked += 1;
                    let cancel = Cancel::at(Some(Instant::now() + Duration::from_micros(rng.below(30) as u64)));
                    let found = session.search_levels_cancellable(&ds, &context, &q, levels, None, &cancel).unwrap();
                    match found {
                        Some(found) => {
                            assert_eq!(found.trees, expected, "{context:?} {q:?}");
                            continue;
                        }
                        None => given_up += 1,
                    }
                    if rng.below(4) == 0 {
                        // Something else first: other levels, or a shorter context.
                        let (other, other_levels) = if rng.below(2) == 0 {
                            (context.clone(), 1 + levels % 4)
                        } else {
                            (context[..context.len().div_ceil(2)].to_vec(), levels)
                        };
                        let want = ds.search_levels(&other, &q, other_levels, None).unwrap();
                        assert_eq!(session.search_levels(&ds, &other, &q, other_levels, None).unwrap(), want);
                    }
                }
                let got = session.search_levels(&ds, &context, &q, levels, None).unwrap();
                assert_eq!(got, expected, "{context:?} {q:?}");
            }
        }
    }
    assert!(given_up > 0 && given_up < asked, "{given_up} of {asked} given up");
}

#[test]
fn a_session_moved_to_other_shards_or_another_datastore_starts_afresh() {
    let tmp = tempfile::tempdir().unwrap();
    let mut rng = Rng(77);
    let docs = random_corpus(&mut rng, 5, 20, 200);
    let other_docs = random_corpus(&mut rng, 5, 20, 200);
    let ds = build(&tmp.path().join("a"), &docs, 5, 500);
    let other = build(&tmp.path().join("b"), &other_docs, 5, 500);
    assert!(ds.shards.len() >= 2);
    let names: Vec<String> = ds.shard_names();
    let mut session = SearchSession::new();
    let q = Query { min_span: 1, max_span: 6, budget: 16, ..Query::default() };
    for (step, context) in random_session(&mut rng, &docs, 5, 120).into_iter().enumerate() {
        let (store, only) = match step % 3 {
            0 => (&ds, None),
            1 => (&ds, Some(&names[..1])),
            _ => (&other, None),
        };
        let expected = store.search_levels(&context, &q, 2, only).unwrap();
        assert_eq!(session.search_levels(store, &context, &q, 2, only).unwrap(), expected);
    }
}

#[test]
fn large_intervals_stay_exact_in_every_layout() {
    // Two or three symbols: intervals far larger than the budget, split by sampling.
    let tmp = tempfile::tempdir().unwrap();
    let mut rng = Rng(5);
    for corpus in 0..4 {
        let vocab = 2 + corpus % 2;
        let docs: Vec<Vec<i64>> =
            (0..6).map(|_| (0..3000).map(|_| [0, 0, 0, 1, 1, 2][rng.below(6)] % vocab as i64).collect()).collect();
        let one = build(&tmp.path().join(format!("one{corpus}")), &docs, vocab as u32, 1 << 20);
        let many = build(&tmp.path().join(format!("many{corpus}")), &docs, vocab as u32, 3001 * 2);
        for _ in 0..25 {
            let context: Vec<i64> = (0..1 + rng.below(4)).map(|_| rng.below(vocab) as i64).collect();
            let q = Query { min_span: 1, max_span: 4, budget: [1, 7, 64, 300][rng.below(4)], max_depth: 1 + rng.below(8), ..Query::default() };
            let expected = one.search_levels(&context, &q, 2, None).unwrap();
            assert_eq!(many.search_levels(&context, &q, 2, None).unwrap(), expected, "{context:?} {q:?}");
            if q.budget <= 64 && q.max_depth <= 4 {
                assert_eq!(expected, reference_levels(&docs, &context, &q, 2), "{context:?} {q:?}");
            }
        }
    }
}
