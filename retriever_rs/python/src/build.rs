//! Binding of `rest_retriever::build`.

use crate::errors::to_py;
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use rest_retriever::{BuildOptions, Builder};
use std::path::PathBuf;

/// Writes a datastore directory; `finish()` publishes it, dropping it unfinished removes it.
#[pyclass(module = "rest._engine")]
pub struct DatastoreBuilder {
    inner: Option<Builder>,
}

impl DatastoreBuilder {
    fn builder(&mut self) -> PyResult<&mut Builder> {
        self.inner.as_mut().ok_or_else(|| PyRuntimeError::new_err("this builder is already finished or aborted"))
    }
}

#[pymethods]
impl DatastoreBuilder {
    #[new]
    #[pyo3(signature = (out_dir, vocab_size, tokenizer_name, tokenizer_fingerprint, shard_tokens=1<<28, parallel_shards=2, overwrite=false))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        out_dir: PathBuf,
        vocab_size: u32,
        tokenizer_name: String,
        tokenizer_fingerprint: String,
        shard_tokens: u64,
        parallel_shards: usize,
        overwrite: bool,
    ) -> PyResult<Self> {
        let opts = BuildOptions {
            vocab_size,
            tokenizer_name,
            tokenizer_fingerprint,
            shard_tokens,
            parallel_shards,
            overwrite,
        };
        Ok(DatastoreBuilder { inner: Some(Builder::create(&out_dir, opts).map_err(to_py)?) })
    }

    /// Appends documents (each a list of token ids); returns the tokens added so far.
    fn add_documents(&mut self, py: Python<'_>, docs: Vec<Vec<i64>>) -> PyResult<u64> {
        let builder = self.builder()?;
        py.detach(|| {
            for doc in &docs {
                builder.add_document(doc)?;
            }
            Ok(builder.tokens_added())
        })
        .map_err(to_py)
    }

    /// Writes the last shard and the manifest and renames the directory into place.
    /// Returns the manifest as JSON text.
    fn finish(&mut self, py: Python<'_>) -> PyResult<String> {
        let builder = self.inner.take().ok_or_else(|| PyRuntimeError::new_err("this builder is already finished or aborted"))?;
        py.detach(|| builder.finish()).map(|m| m.to_json()).map_err(to_py)
    }

    /// Discards everything written so far.
    fn abort(&mut self) {
        self.inner = None;
    }
}
