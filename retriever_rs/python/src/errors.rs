//! The single place where core errors become Python exceptions.

use pyo3::exceptions::{PyKeyError, PyValueError};
use pyo3::{create_exception, PyErr};
use rest_retriever::Error;

create_exception!(
    _engine,
    DatastoreError,
    pyo3::exceptions::PyException,
    "A datastore file is missing, unreadable, truncated, corrupt or of another format version."
);

create_exception!(
    _engine,
    ShardUnavailableError,
    DatastoreError,
    "A shard is out of service: its file changed while it was mapped, or it failed a check."
);

/// Bad requests become ValueError, unknown shards KeyError, shards out of service
/// ShardUnavailableError, other file problems DatastoreError.
pub fn to_py(err: Error) -> PyErr {
    match err {
        Error::InvalidQuery(_) | Error::InvalidInput(_) => PyValueError::new_err(err.to_string()),
        Error::UnknownShard(_) => PyKeyError::new_err(err.to_string()),
        Error::ShardUnavailable { .. } | Error::NoShardInService(_) => ShardUnavailableError::new_err(err.to_string()),
        _ => DatastoreError::new_err(err.to_string()),
    }
}
