//! Binding of `rest_retriever::format`: the checksum the format uses, for tools and tests that
//! write or check files by hand.

use pyo3::prelude::*;

/// xxh3-64 of `data`: what shard headers and the manifest record (docs/DATASTORE_FORMAT.md).
#[pyfunction]
pub fn checksum(data: &[u8]) -> u64 {
    rest_retriever::format::checksum(data)
}
