//! Profiling aid: replays targets (one per line: prompt length, then the token ids) step by step
//! against a datastore, as the model-free replay does (each step accepts the longest tree path
//! that the target follows, plus one token), and prints the time per search.
//!
//!     cargo run --release --example profile_search -- DATASTORE TARGETS [budget] [rounds] [levels] [session]
use rest_retriever::{Datastore, Query, SearchSession, Tree};
use std::time::Instant;

fn accepted(tree: &Tree, target: &[i64]) -> usize {
    // The depth of each node whose path the target follows.
    let mut depth = vec![0usize; tree.tokens.len()];
    let mut best = 0;
    for j in 0..tree.tokens.len() {
        let parent_depth = if tree.parents[j] < 0 { 0 } else { depth[tree.parents[j] as usize] };
        let followed = tree.parents[j] < 0 || parent_depth > 0;
        if followed && target.get(parent_depth) == Some(&(tree.tokens[j] as i64)) {
            depth[j] = parent_depth + 1;
            best = best.max(depth[j]);
        }
    }
    best
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let ds = Datastore::open(args[1].as_ref(), None).expect("open");
    let budget: usize = args.get(3).map_or(64, |s| s.parse().unwrap());
    let rounds: usize = args.get(4).map_or(3, |s| s.parse().unwrap());
    let levels: usize = args.get(5).map_or(1, |s| s.parse().unwrap());
    let use_session = args.get(6).is_some_and(|s| s == "session");
    let targets: Vec<(usize, Vec<i64>)> = std::fs::read_to_string(&args[2])
        .unwrap()
        .lines()
        .map(|line| {
            let v: Vec<i64> = line.split(' ').map(|x| x.parse().unwrap()).collect();
            (v[0] as usize, v[1..].to_vec())
        })
        .collect();
    let q = Query { budget, ..Query::default() };
    let mut times = Vec::new();
    let mut nodes = 0usize;
    let start = Instant::now();
    for _ in 0..rounds {
        for (prompt_len, tokens) in &targets {
            let mut session = SearchSession::new();
            let mut i = *prompt_len;
            while i < tokens.len() {
                let context = &tokens[i.saturating_sub(15)..=i];
                let t0 = Instant::now();
                let trees = if use_session {
                    session.search_levels(&ds, context, &q, levels, None).unwrap()
                } else {
                    ds.search_levels(context, &q, levels, None).unwrap()
                };
                times.push(t0.elapsed().as_nanos() as f64 / 1e3);
                nodes += trees[0].tokens.len();
                i += 1 + accepted(&trees[0], &tokens[i + 1..]);
            }
        }
    }
    let n = times.len() as f64;
    let total = start.elapsed().as_secs_f64();
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let pct = |p: f64| times[((times.len() - 1) as f64 * p) as usize];
    println!(
        "{} searches, mean {:.2} us, p50 {:.2}, p90 {:.2}, p99 {:.2}, {:.1} nodes, total {:.2}s",
        n,
        times.iter().sum::<f64>() / n,
        pct(0.5),
        pct(0.9),
        pct(0.99),
        nodes as f64 / n,
        total
    );
}
