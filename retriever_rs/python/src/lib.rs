//! Python bindings of the rest-retriever core: a thin mirror, one file per core module.

use pyo3::prelude::*;

mod build;
mod datastore;
mod draft;
mod errors;
mod executor;
mod format;
mod grpc;
mod grpc_client;
mod scrub;
mod wire;

#[pymodule]
fn _engine(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("DatastoreError", m.py().get_type::<errors::DatastoreError>())?;
    m.add("ShardUnavailableError", m.py().get_type::<errors::ShardUnavailableError>())?;
    m.add("FORMAT_VERSION", rest_retriever::format::FORMAT_VERSION)?;
    m.add("MAX_SHARD_TOKENS", rest_retriever::format::MAX_SHARD_TOKENS)?;
    m.add_function(wrap_pyfunction!(format::checksum, m)?)?;
    m.add_class::<datastore::Datastore>()?;
    m.add_class::<datastore::SearchSession>()?;
    m.add("MAX_LEVELS", datastore::MAX_LEVELS)?;
    m.add_class::<build::DatastoreBuilder>()?;
    m.add_class::<executor::SearchExecutor>()?;
    m.add_class::<draft::Drafter>()?;
    m.add_class::<draft::ServedIndex>()?;
    m.add_class::<draft::LevelCache>()?;
    m.add_function(wrap_pyfunction!(draft::score_levels, m)?)?;
    m.add_class::<scrub::Scrub>()?;
    m.add_function(wrap_pyfunction!(wire::decode_search_response, m)?)?;
    m.add_class::<wire::RequestLimits>()?;
    m.add_class::<grpc::NativeSearchServer>()?;
    m.add_class::<grpc::NativeEchoServer>()?;
    m.add_class::<grpc_client::Mailbox>()?;
    m.add_class::<grpc_client::NativeSearchChannel>()?;
    m.add_class::<grpc_client::NativeSearchStream>()?;
    Ok(())
}
