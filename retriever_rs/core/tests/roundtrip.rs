use rest_retriever::{BuildOptions, Builder, Datastore, Error, Policy, Query};
use std::path::Path;

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

#[test]
fn builds_opens_and_searches() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = build(&tmp.path().join("ds"), &[vec![1, 2, 3, 4], vec![1, 2, 3, 5], vec![1, 2, 3, 4]], 8, 1 << 20);
    ds.verify().unwrap();
    let t = ds.search(&[9, 1, 2, 3], &Query::default(), None).unwrap_err();
    assert!(matches!(t, Error::InvalidQuery(_)));
    let t = ds.search(&[0, 1, 2, 3], &Query::default(), None).unwrap();
    assert_eq!((t.match_length, t.occurrences), (3, 3));
    assert_eq!(t.tokens, vec![4, 5]);
    assert_eq!(t.counts, vec![2, 1]);
}

#[test]
fn shards_merge_counts() {
    let tmp = tempfile::tempdir().unwrap();
    let docs = vec![vec![1, 2, 3], vec![1, 2, 3], vec![1, 2, 4]];
    let one = build(&tmp.path().join("one"), &docs, 8, 1 << 20);
    let many = build(&tmp.path().join("many"), &docs, 8, 4);
    assert_eq!(many.shards.len(), 3);
    for policy in [Policy::Exact, Policy::Rest] {
        let q = Query { policy, ..Query::default() };
        assert_eq!(one.search(&[1, 2], &q, None).unwrap(), many.search(&[1, 2], &q, None).unwrap());
    }
}

#[test]
fn wide_vocabulary_round_trips() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = build(&tmp.path().join("ds"), &[vec![100_000, 70_000, 150_000]], 151_000, 1 << 20);
    assert_eq!(ds.manifest.token_width, 4);
    let t = ds.search(&[100_000, 70_000], &Query::default(), None).unwrap();
    assert_eq!(t.tokens, vec![150_000]);
}

#[test]
fn truncated_shard_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ds");
    build(&dir, &[vec![1, 2, 3]], 8, 1 << 20);
    let shard = dir.join("shard-00000.rds");
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() - 4]).unwrap();
    let err = Datastore::open(&dir, None).err().unwrap();
    assert!(matches!(err, Error::Truncated { .. }), "{err}");
    assert!(err.to_string().contains("shard-00000.rds"));
}

#[test]
fn a_time_limited_search_finishes_like_search_or_gives_up() {
    use std::time::{Duration, Instant};
    let tmp = tempfile::tempdir().unwrap();
    let docs: Vec<Vec<i64>> = (0..40).map(|d| (0..300).map(|i| (i * 7 + d) % 5).collect()).collect();
    let ds = build(&tmp.path().join("ds"), &docs, 8, 1 << 20);
    let q = Query { min_span: 1, budget: 48, ..Query::default() };
    let later = Instant::now() + Duration::from_secs(60);
    for context in [vec![1i64, 3], vec![4, 1, 3, 0], vec![7]] {
        let full = ds.search(&context, &q, None).unwrap();
        assert_eq!(ds.search_until(&context, &q, None, Some(later)).unwrap(), Some(full.clone()));
        let given_up = ds.search_until(&context, &q, None, Some(Instant::now())).unwrap();
        // Nothing to grow (no match) finishes at once; a tree to grow is given up.
        assert_eq!(given_up.is_none(), !full.tokens.is_empty(), "{context:?}");
    }
    // The REST policy stops early too (its occurrence walk asks the same cancel token).
    let rest = Query { policy: Policy::Rest, ..q };
    let full = ds.search(&[1, 3], &rest, None).unwrap();
    assert!(!full.tokens.is_empty());
    assert_eq!(ds.search_until(&[1, 3], &rest, None, Some(later)).unwrap(), Some(full));
    assert_eq!(ds.search_until(&[1, 3], &rest, None, Some(Instant::now())).unwrap(), None);
}
