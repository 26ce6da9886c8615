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

/// Bad requests become ValueError, unknown shards KeyError, file problems DatastoreError.
pub fn to_py(err: Error) -> PyErr {
    match err {
        Error::InvalidQuery(_) | Error::InvalidInput(_) => PyValueError::new_err(err.to_string()),
        Error::UnknownShard(_) => PyKeyError::new_err(err.to_string()),
        _ => DatastoreError::new_err(err.to_string()),
    }
}
