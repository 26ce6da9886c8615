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

    /// Appends documents given as one flat little-endian u32 token buffer and their lengths
    /// (the fast path for numpy arrays: no per-token Python objects).
    fn add_flat(&mut self, py: Python<'_>, tokens: &[u8], doc_lengths: Vec<u64>) -> PyResult<u64> {
        let builder = self.builder()?;
        if tokens.len() % 4 != 0 || doc_lengths.iter().sum::<u64>() * 4 != tokens.len() as u64 {
            return Err(pyo3::exceptions::PyValueError::new_err(
                "tokens must hold 4 bytes per token and doc_lengths must sum to the token count",
            ));
        }
        py.detach(|| {
            let mut at = 0usize;
            let mut doc = Vec::new();
            for &len in &doc_lengths {
                let end = at + len as usize * 4;
                doc.clear();
                doc.extend(tokens[at..end].chunks_exact(4).map(|b| u32::from_le_bytes(b.try_into().unwrap()) as i64));
                builder.add_document(&doc)?;
                at = end;
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
