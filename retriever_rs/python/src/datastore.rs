//! Binding of `rest_retriever::datastore`.

use crate::errors::to_py;
use crate::wire::encode_search_response;
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use rest_retriever::{Found, OpenOptions, Policy, Query, Tree, Watching};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// (match_length, occurrences, tokens, parents, counts)
pub(crate) type TreeTuple = (u32, u64, Vec<u32>, Vec<i32>, Vec<u64>);

fn to_tuple(t: Tree) -> TreeTuple {
    (t.match_length, t.occurrences, t.tokens, t.parents, t.counts)
}

/// A memory-mapped datastore directory.
#[pyclass(frozen, module = "rest._engine")]
pub struct Datastore {
    // Shared with the search executor's worker threads.
    inner: Arc<rest_retriever::Datastore>,
}

impl Datastore {
    pub(crate) fn shared(&self) -> Arc<rest_retriever::Datastore> {
        self.inner.clone()
    }

    /// The names of the shards a search covered.
    pub(crate) fn searched_names(store: &rest_retriever::Datastore, found: &Found) -> Vec<String> {
        found.searched.iter().map(|&i| store.shards[i].name.clone()).collect()
    }
}

/// A search's parameters as Python passes them: `(min_span, max_span, budget, max_depth, policy)`.
#[derive(FromPyObject)]
pub(crate) struct QueryArgs(usize, usize, usize, usize, String);

impl QueryArgs {
    pub(crate) fn to_query(&self) -> PyResult<Query> {
        let QueryArgs(min_span, max_span, budget, max_depth, policy) = self;
        let policy: Policy = policy.parse().map_err(to_py)?;
        Ok(Query { min_span: *min_span, max_span: *max_span, budget: *budget, max_depth: *max_depth, policy })
    }
}

/// A finished search in the form its caller asked for, made without the GIL.
pub(crate) enum Answer {
    /// The tree, the requested shards' names joined by commas (empty: every shard), and the
    /// names of the shards the search covered (those in service).
    Tuple(TreeTuple, String, Vec<String>),
    /// The retrieval service's `SearchResponse`, serialized.
    Wire(Vec<u8>),
}

impl Answer {
    pub(crate) fn new(tree: Tree, shards: Option<&[String]>, searched: Vec<String>, as_wire: bool) -> Self {
        let label = shards.map(|s| s.join(",")).unwrap_or_default();
        if as_wire {
            Answer::Wire(encode_search_response(tree, label, searched))
        } else {
            Answer::Tuple(to_tuple(tree), label, searched)
        }
    }

    pub(crate) fn into_py(self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        Ok(match self {
            Answer::Tuple(tuple, label, searched) => (tuple, label, searched).into_pyobject(py)?.into_any().unbind(),
            Answer::Wire(bytes) => PyBytes::new(py, &bytes).into_any().unbind(),
        })
    }
}

#[pymethods]
impl Datastore {
    /// Opens the datastore directory `path` (only the named shards when `shards` is given).
    /// `leases`, `inotify`: how shard files are watched for changes (docs/DATASTORE_FORMAT.md);
    /// `tolerate_bad_shards`: a shard that cannot be opened stays out of service instead of
    /// failing the open.
    #[staticmethod]
    #[pyo3(signature = (path, shards=None, leases=true, inotify=true, tolerate_bad_shards=false))]
    fn open(
        py: Python<'_>,
        path: PathBuf,
        shards: Option<Vec<String>>,
        leases: bool,
        inotify: bool,
        tolerate_bad_shards: bool,
    ) -> PyResult<Self> {
        let options = OpenOptions { only: shards, watching: Watching { leases, inotify }, tolerate_bad_shards };
        let inner = py.detach(|| rest_retriever::Datastore::open_with(&path, &options)).map_err(to_py)?;
        Ok(Datastore { inner: Arc::new(inner) })
    }

    /// Every shard, in manifest order, as `(name, reason)`: reason is None while it serves.
    fn shard_states(&self) -> Vec<(String, Option<String>)> {
        self.inner.shard_states()
    }

    /// Whether each opened shard holds a read lease, as `{name: bool}`.
    fn shard_leases(&self) -> std::collections::HashMap<String, bool> {
        self.inner.shards.iter().map(|s| (s.name.clone(), s.has_lease())).collect()
    }

    /// The file descriptor that becomes readable when `shard_changes` has changes.
    fn events_fileno(&self) -> i32 {
        self.inner.events().fileno()
    }

    /// The shards that went out of service since the last call, as `(name, path, serving,
    /// reason)`, oldest first; the first call also returns the shards refused at open.
    fn shard_changes(&self) -> Vec<(String, PathBuf, bool, String)> {
        self.inner.events().take().into_iter().map(|c| (c.shard, c.path, c.serving, c.reason)).collect()
    }

    /// Takes the named shard out of service with `reason` (a failed check, for instance).
    fn take_out_of_service(&self, name: &str, reason: String) -> PyResult<()> {
        self.inner.take_out_of_service(name, reason).map_err(to_py)
    }

    /// `verify`, shard by shard: `[(name, message)]` for each shard that fails.
    fn verify_each(&self, py: Python<'_>) -> Vec<(String, String)> {
        py.detach(|| self.inner.verify_each()).into_iter().map(|(name, err)| (name, err.to_string())).collect()
    }

    #[getter]
    fn path(&self) -> PathBuf {
        self.inner.dir.clone()
    }
    #[getter]
    fn format_version(&self) -> u32 {
        self.inner.format_version()
    }
    #[getter]
    fn vocab_size(&self) -> u32 {
        self.inner.manifest.vocab_size
    }
    #[getter]
    fn token_width(&self) -> u32 {
        self.inner.manifest.token_width
    }
    #[getter]
    fn n_tokens(&self) -> u64 {
        self.inner.n_tokens()
    }
    #[getter]
    fn n_docs(&self) -> u64 {
        self.inner.n_docs()
    }
    #[getter]
    fn tokenizer_name(&self) -> String {
        self.inner.manifest.tokenizer_name.clone()
    }
    #[getter]
    fn tokenizer_fingerprint(&self) -> String {
        self.inner.manifest.tokenizer_fingerprint.clone()
    }
    #[getter]
    fn shard_names(&self) -> Vec<String> {
        self.inner.shard_names()
    }
    /// The manifest as JSON text.
    fn manifest_json(&self) -> String {
        self.inner.manifest.to_json()
    }

    /// The continuation tree of `context` as `(tree tuple, shard label, searched shards)`: the
    /// tuple is (match_length, occurrences, tokens, parents, counts).
    #[pyo3(signature = (context, query, shards=None))]
    fn search(
        &self,
        py: Python<'_>,
        context: Vec<i64>,
        query: QueryArgs,
        shards: Option<Vec<String>>,
    ) -> PyResult<Py<PyAny>> {
        let q = query.to_query()?;
        let never = rest_retriever::Cancel::never();
        let answer = py
            .detach(|| {
                let found = self.inner.search_cancellable(&context, &q, shards.as_deref(), &never)?;
                let found = found.expect("never cancelled");
                let searched = Datastore::searched_names(&self.inner, &found);
                Ok(Answer::new(found.tree, shards.as_deref(), searched, false))
            })
            .map_err(to_py)?;
        answer.into_py(py)
    }

    /// `search` as `(tree tuple, shard label)`, or the serialized `SearchResponse` with
    /// `as_wire`; None when it has not finished within `time_limit_us` microseconds (always None
    /// for the REST policy, which cannot stop early).
    #[pyo3(signature = (context, query, shards, time_limit_us, as_wire=false))]
    fn try_search(
        &self,
        py: Python<'_>,
        context: Vec<i64>,
        query: QueryArgs,
        shards: Option<Vec<String>>,
        time_limit_us: u64,
        as_wire: bool,
    ) -> PyResult<Option<Py<PyAny>>> {
        let q = query.to_query()?;
        // Capped at a day: a longer limit means none, and must not overflow the clock.
        let stop_at = Instant::now() + Duration::from_micros(time_limit_us.min(86_400_000_000));
        let cancel = rest_retriever::Cancel::at(Some(stop_at));
        let answer = py
            .detach(|| {
                let found = self.inner.search_cancellable(&context, &q, shards.as_deref(), &cancel)?;
                Ok(found.map(|found| {
                    let searched = Datastore::searched_names(&self.inner, &found);
                    Answer::new(found.tree, shards.as_deref(), searched, as_wire)
                }))
            })
            .map_err(to_py)?;
        answer.map(|a| a.into_py(py)).transpose()
    }

    /// Many searches at once, in parallel, without the GIL: `search`'s answer for each.
    #[pyo3(signature = (contexts, query, shards=None))]
    fn search_batch(
        &self,
        py: Python<'_>,
        contexts: Vec<Vec<i64>>,
        query: QueryArgs,
        shards: Option<Vec<String>>,
    ) -> PyResult<Vec<Py<PyAny>>> {
        let q = query.to_query()?;
        let answers = py
            .detach(|| {
                let found = self.inner.search_batch(&contexts, &q, shards.as_deref())?;
                Ok(found
                    .into_iter()
                    .map(|f| {
                        let searched = Datastore::searched_names(&self.inner, &f);
                        Answer::new(f.tree, shards.as_deref(), searched, false)
                    })
                    .collect::<Vec<_>>())
            })
            .map_err(to_py)?;
        answers.into_iter().map(|a| a.into_py(py)).collect()
    }

    /// The slow full check: checksums and suffix-array structure of every open shard.
    fn verify(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| self.inner.verify()).map_err(to_py)
    }
}
