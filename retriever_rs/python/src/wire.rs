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
use rest_retriever::Tree;

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
