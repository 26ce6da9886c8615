//! Shard files changed under an open datastore (truncated, copied over, written in place): the
//! process lives, the shard goes out of service with the reason, the other shards serve on.
//! The changes are made by real processes (`truncate`, `cp`, `dd`), as an operator would.

use rest_retriever::{BuildOptions, Builder, Datastore, Error, OpenOptions, Query, Watching};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// Two shards of 60,000 tokens each (hundreds of pages), over a small alphabet.
fn build(dir: &Path) -> Vec<Vec<i64>> {
    let docs: Vec<Vec<i64>> = (0..120).map(|d| (0..999).map(|i| ((i * 7 + d * 3) % 11) as i64).collect()).collect();
    let opts = BuildOptions {
        vocab_size: 16,
        tokenizer_name: "t".into(),
        tokenizer_fingerprint: "f".into(),
        shard_tokens: 60_000,
        ..BuildOptions::default()
    };
    let mut b = Builder::create(dir, opts).unwrap();
    for d in &docs {
        b.add_document(d).unwrap();
    }
    b.finish().unwrap();
    docs
}

fn open(dir: &Path, leases: bool, inotify: bool) -> Datastore {
    let options = OpenOptions { watching: Watching { leases, inotify }, ..OpenOptions::default() };
    let ds = Datastore::open_with(dir, &options).unwrap();
    assert_eq!(ds.shards.len(), 2);
    ds
}

fn run(program: &str, args: &[&str]) {
    let status = Command::new(program).args(args).status().unwrap();
    assert!(status.success(), "{program} {args:?}");
}

fn wait_out_of_service(ds: &Datastore, shard: usize) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Some(reason) = ds.shards[shard].out_of_service_reason() {
            return reason;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    panic!("shard {shard} still in service");
}

const CONTEXT: [i64; 3] = [7, 3, 10];

fn query() -> Query {
    Query { min_span: 1, budget: 32, ..Query::default() }
}

#[test]
fn a_truncated_shard_faults_into_zeros_and_out_of_service() {
    // No lease, no inotify: only the SIGBUS guard stands between the truncation and a crash.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ds");
    build(&dir);
    let ds = open(&dir, false, false);
    let both = ds.search(&CONTEXT, &query(), None).unwrap();
    assert!(both.occurrences > 0);
    let only_second = ds.search(&CONTEXT, &query(), Some(&["shard-00001".to_string()])).unwrap();

    run("truncate", &["-s", "1000", dir.join("shard-00000.rds").to_str().unwrap()]);
    // The next search reads past the new end of shard 0: SIGBUS, zeros, then a retry without it.
    let found = ds.search_cancellable(&CONTEXT, &query(), None, &rest_retriever::Cancel::never()).unwrap().unwrap();
    assert_eq!(found.searched, vec![1]);
    assert_eq!(found.tree, only_second);
    let reason = ds.shards[0].out_of_service_reason().expect("out of service");
    assert!(reason.contains("1000 bytes"), "{reason}");
    let err = ds.search(&CONTEXT, &query(), Some(&["shard-00000".to_string()])).unwrap_err();
    assert!(matches!(err, Error::ShardUnavailable { .. }), "{err}");
    assert!(ds.shards[1].is_serving());
    // The watcher announces it.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut changes = Vec::new();
    while changes.is_empty() && Instant::now() < deadline {
        changes = ds.events().take();
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(changes.len(), 1);
    assert_eq!(changes[0].shard, "shard-00000");
    assert!(!changes[0].serving);
}

#[test]
fn a_lease_takes_the_shard_out_of_service_before_the_truncation() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ds");
    build(&dir);
    let ds = open(&dir, true, false);
    if !ds.shards[0].has_lease() {
        eprintln!("skipped: no lease (neither the file's owner nor CAP_LEASE)");
        return;
    }
    // coreutils `truncate` opens with O_NONBLOCK, which a lease answers with EAGAIN while it is
    // being broken: like an operator, try again.
    let shard = dir.join("shard-00000.rds");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !Command::new("truncate").args(["-s", "1000", shard.to_str().unwrap()]).status().unwrap().success() {
        assert!(Instant::now() < deadline, "truncate kept failing");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(std::fs::metadata(&shard).unwrap().len(), 1000);
    // `truncate` succeeded, so the lease was released: the shard went out of service first.
    let reason = ds.shards[0].out_of_service_reason().expect("out of service before truncate returned");
    assert!(reason.contains("lease"), "{reason}");
    let found = ds.search_cancellable(&CONTEXT, &query(), None, &rest_retriever::Cancel::never()).unwrap().unwrap();
    assert_eq!(found.searched, vec![1]);
}

#[test]
fn copying_another_file_over_a_shard_takes_it_out_of_service() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ds");
    build(&dir);
    for (leases, inotify) in [(true, true), (false, true)] {
        let ds = open(&dir, leases, inotify);
        run("cp", &[dir.join("shard-00001.rds").to_str().unwrap(), dir.join("shard-00000.rds").to_str().unwrap()]);
        let reason = wait_out_of_service(&ds, 0);
        assert!(!reason.is_empty());
        assert!(ds.shards[1].is_serving());
        let found = ds.search_cancellable(&CONTEXT, &query(), None, &rest_retriever::Cancel::never()).unwrap().unwrap();
        assert_eq!(found.searched, vec![1], "leases={leases}");
        drop(ds);
        // Whole again for the next round (a copy of the right content: the other shard's
        // header differs, so rebuild).
        std::fs::remove_dir_all(&dir).unwrap();
        build(&dir);
    }
}

#[test]
fn bytes_written_in_place_take_the_shard_out_of_service() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ds");
    build(&dir);
    let ds = open(&dir, false, true);
    let shard = dir.join("shard-00000.rds");
    run("dd", &["if=/dev/zero", &format!("of={}", shard.display()), "bs=4096", "seek=10", "count=2", "conv=notrunc", "status=none"]);
    let reason = wait_out_of_service(&ds, 0);
    assert!(reason.contains("written in place"), "{reason}");
}

#[test]
fn the_scrub_finds_bytes_changed_where_nothing_watched() {
    use rest_retriever::scrub::Scrub;
    use std::sync::atomic::Ordering;
    use std::sync::Arc;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ds");
    build(&dir);
    let ds = Arc::new(open(&dir, false, false));
    let mut scrub = Scrub::start(ds.clone(), 0, Duration::from_millis(1)).unwrap();
    // Whole shards pass, again and again, without going out of service.
    let deadline = Instant::now() + Duration::from_secs(20);
    while scrub.stats().passes.load(Ordering::Relaxed) < 2 {
        assert!(Instant::now() < deadline, "no scrub pass finished");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(ds.shards.iter().all(|s| s.is_serving()));
    // One suffix-array entry rewritten in place (same size, nothing watching).
    let shard = dir.join("shard-00001.rds");
    let len = std::fs::metadata(&shard).unwrap().len();
    run("dd", &["if=/dev/urandom", &format!("of={}", shard.display()), "bs=1", &format!("seek={}", len - 4), "count=4", "conv=notrunc", "status=none"]);
    let reason = wait_out_of_service(&ds, 1);
    assert!(reason.contains("suffix array") && reason.contains("modified in place"), "{reason}");
    assert!(ds.shards[0].is_serving());
    assert_eq!(scrub.stats().found.load(Ordering::Relaxed), 1);
    scrub.stop();
}

#[test]
fn the_scrub_keeps_to_its_rate() {
    use rest_retriever::scrub::Scrub;
    use std::sync::atomic::Ordering;
    use std::sync::Arc;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ds");
    build(&dir);
    let ds = Arc::new(open(&dir, false, false));
    let rate = 200_000; // bytes per second
    let scrub = Scrub::start(ds, rate, Duration::ZERO).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let read = scrub.stats().bytes.load(Ordering::Relaxed);
    // One chunk may go ahead of the pace; never more than the rate allows after that.
    assert!(read <= rate / 2 + (1 << 20), "{read} bytes in 0.5 s at {rate} B/s");
    assert!(read > 0);
}
