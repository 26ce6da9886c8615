//! The retrieval service's `rest.retriever.v1.SearchResponse` message, encoded here.
//!
//! The server answers every search with this message; encoding it from the engine's tree in
//! Rust saves converting the tree to Python objects and building the message from them, which
//! cost more than the rest of the server's Python work per search. The fields mirror
//! proto/rest/retriever/v1/retriever.proto; tests/rest/test_search_executor.py checks that the
//! bytes are exactly what the generated Python message serializes to.

use prost::Message;
use rest_retriever::Tree;

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
    #[prost(string, repeated, tag = "8")]
    searched_shards: Vec<String>,
}

/// The serialized `SearchResponse` for `tree`, searched in the shards `shard` names, covering
/// the shards `searched_shards` (those in service).
pub fn encode_search_response(tree: Tree, shard: String, searched_shards: Vec<String>) -> Vec<u8> {
    SearchResponse {
        match_length: tree.match_length,
        occurrences: tree.occurrences,
        tokens: tree.tokens,
        parents: tree.parents,
        counts: tree.counts,
        shard,
        searched_shards,
    }
    .encode_to_vec()
}
