//! The retrieval service's `rest.retriever.v1.SearchResponse` message, encoded here.
//!
//! The server answers every search with this message; encoding it from the engine's trees in
//! Rust saves converting the trees to Python objects and building the message from them, which
//! cost more than the rest of the server's Python work per search. The fields mirror
//! proto/rest/retriever/v1/retriever.proto; tests/retriever_service/test_native_wire.py checks
//! that the bytes are exactly what the generated Python message serializes to.

use prost::Message;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyList, PyTuple};
use rest_retriever::{Policy, Query, Tree};

#[derive(Clone, PartialEq, Message)]
struct Level {
    #[prost(uint32, tag = "1")]
    match_length: u32,
    #[prost(uint64, tag = "2")]
    occurrences: u64,
    #[prost(uint32, repeated, tag = "3")]
    tokens: Vec<u32>,
    #[prost(int32, repeated, tag = "4")]
    parents: Vec<i32>,
    #[prost(uint64, repeated, tag = "5")]
    counts: Vec<u64>,
    #[prost(uint64, tag = "6")]
    cut_count: u64,
}

#[derive(Clone, PartialEq, Message)]
struct SearchResponse {
    #[prost(uint32, tag = "1")]
    match_length: u32,
    #[prost(uint64, tag = "2")]
    occurrences: u64,
    #[prost(uint32, repeated, tag = "3")]
    tokens: Vec<u32>,
    #[prost(int32, repeated, tag = "4")]
    parents: Vec<i32>,
    #[prost(uint64, repeated, tag = "5")]
    counts: Vec<u64>,
    #[prost(string, tag = "6")]
    shard: String,
    #[prost(message, repeated, tag = "7")]
    backoff: Vec<Level>,
    #[prost(string, repeated, tag = "8")]
    searched_shards: Vec<String>,
    #[prost(uint64, tag = "9")]
    cut_count: u64,
}

/// The serialized `SearchResponse` for the back-off levels `trees` (the first one in fields 1-5
/// and 9, the others in `backoff`), searched in the shards `shard` names (empty: all) and
/// covering `searched_shards`.
pub fn encode_search_response(trees: Vec<Tree>, shard: String, searched_shards: Vec<String>) -> Vec<u8> {
    let mut levels = trees.into_iter();
    let first = levels.next().unwrap_or_default();
    SearchResponse {
        match_length: first.match_length,
        occurrences: first.occurrences,
        tokens: first.tokens,
        parents: first.parents,
        counts: first.counts,
        shard,
        backoff: levels
            .map(|t| Level {
                match_length: t.match_length,
                occurrences: t.occurrences,
                tokens: t.tokens,
                parents: t.parents,
                counts: t.counts,
                cut_count: t.cut_count,
            })
            .collect(),
        searched_shards,
        cut_count: first.cut_count,
    }
    .encode_to_vec()
}

/// `SearchResponse` bytes decoded: `(levels, shard, searched_shards)`, each level the engine's
/// `(match_length, occurrences, tokens, parents, counts, cut_count)` tuple (what
/// `Datastore.search_levels` gives Python), the first from fields 1-5 and 9, then `backoff`.
/// A client's answer reaches `SearchResult`s without a Python message object or a Python
/// iteration over its repeated fields. Bytes that are not a `SearchResponse`: `ValueError`.
#[pyfunction]
pub fn decode_search_response<'py>(
    py: Python<'py>,
    data: &[u8],
) -> PyResult<(Bound<'py, PyList>, String, Bound<'py, PyTuple>)> {
    let m = SearchResponse::decode(data)
        .map_err(|e| PyValueError::new_err(format!("not a SearchResponse: {e}")))?;
    let level = |match_length: u32, occurrences: u64, tokens: Vec<u32>, parents: Vec<i32>, counts: Vec<u64>, cut_count: u64| {
        (match_length, occurrences, PyTuple::new(py, tokens)?, PyTuple::new(py, parents)?, PyTuple::new(py, counts)?, cut_count)
            .into_pyobject(py)
    };
    let mut levels = Vec::with_capacity(1 + m.backoff.len());
    levels.push(level(m.match_length, m.occurrences, m.tokens, m.parents, m.counts, m.cut_count)?);
    for l in m.backoff {
        levels.push(level(l.match_length, l.occurrences, l.tokens, l.parents, l.counts, l.cut_count)?);
    }
    Ok((PyList::new(py, levels)?, m.shard, PyTuple::new(py, m.searched_shards)?))
}

#[derive(Clone, PartialEq, Message)]
struct WireParams {
    #[prost(uint32, optional, tag = "1")]
    min_span: Option<u32>,
    #[prost(uint32, optional, tag = "2")]
    max_span: Option<u32>,
    #[prost(uint32, optional, tag = "3")]
    budget: Option<u32>,
    #[prost(uint32, optional, tag = "4")]
    max_depth: Option<u32>,
    #[prost(int32, tag = "5")]
    policy: i32,
}

#[derive(Clone, PartialEq, Message)]
struct SearchRequest {
    #[prost(uint32, repeated, tag = "1")]
    context: Vec<u32>,
    #[prost(message, optional, tag = "2")]
    params: Option<WireParams>,
    #[prost(string, optional, tag = "3")]
    shard: Option<String>,
    #[prost(uint32, optional, tag = "4")]
    levels: Option<u32>,
    #[prost(btree_map = "string, string", tag = "5")]
    trace_context: std::collections::BTreeMap<String, String>,
}

/// What a server accepts in a `SearchRequest` (`retriever_service.validation.RequestLimits`),
/// for `Datastore.try_search_request`: the vocabulary, the context limit, the served shards and
/// the largest budget and max_depth per policy.
#[pyclass(frozen, module = "rest._engine")]
#[derive(Clone)]
pub struct RequestLimits {
    vocab_size: u64,
    max_context_tokens: usize,
    shards: Vec<String>,
    exact_caps: (u32, u32),
    rest_caps: (u32, u32),
}

#[pymethods]
impl RequestLimits {
    #[new]
    fn new(vocab_size: u64, max_context_tokens: usize, shards: Vec<String>, exact_caps: (u32, u32), rest_caps: (u32, u32)) -> Self {
        RequestLimits { vocab_size, max_context_tokens, shards, exact_caps, rest_caps }
    }
}

/// A request that passed every check of `retriever_service.validation.SearchRequestParser`.
pub(crate) struct CheckedRequest {
    pub context: Vec<i64>,
    pub query: Query,
    pub shards: Option<Vec<String>>,
    pub levels: usize,
}

/// `data` decoded and checked as the Python parser checks it, or `None` for anything it would
/// refuse (or that this decoder reads differently: a trace context), which the caller leaves to
/// the Python parser and its messages. Never accepts a request that the Python parser refuses.
pub(crate) fn check_search_request(data: &[u8], limits: &RequestLimits) -> Option<CheckedRequest> {
    let m = SearchRequest::decode(data).ok()?;
    if !m.trace_context.is_empty() {
        return None;
    }
    let p = m.params.unwrap_or_default();
    let policy = match p.policy {
        0 | 1 => Policy::Exact,
        2 => Policy::Rest,
        _ => return None,
    };
    // A field left out takes the engine's default, as it does SearchParams' (the same values).
    let defaults = Query::default();
    let min_span = p.min_span.unwrap_or(defaults.min_span as u32);
    let max_span = p.max_span.unwrap_or(defaults.max_span as u32);
    let budget = p.budget.unwrap_or(defaults.budget as u32);
    let max_depth = p.max_depth.unwrap_or(defaults.max_depth as u32);
    let (max_budget, cap_depth) = if policy == Policy::Rest { limits.rest_caps } else { limits.exact_caps };
    if min_span < 1 || max_span < min_span || max_span > 256 || budget > 4096 || budget > max_budget
        || !(1..=256).contains(&max_depth) || max_depth > cap_depth
    {
        return None;
    }
    let n = m.context.len();
    if n == 0 || n > limits.max_context_tokens || m.context.iter().any(|&t| u64::from(t) >= limits.vocab_size) {
        return None;
    }
    let shards = match m.shard {
        Some(shard) if limits.shards.contains(&shard) => Some(vec![shard]),
        Some(_) => return None,
        None => None,
    };
    let levels = match m.levels {
        Some(l) if (1..=crate::datastore::MAX_LEVELS as u32).contains(&l) => l as usize,
        Some(_) => return None,
        None => 1,
    };
    let keep = n.min(max_span as usize);
    let context = m.context[n - keep..].iter().map(|&t| i64::from(t)).collect();
    let query = Query {
        min_span: min_span as usize,
        max_span: max_span as usize,
        budget: budget as usize,
        max_depth: max_depth as usize,
        policy,
    };
    Some(CheckedRequest { context, query, shards, levels })
}
