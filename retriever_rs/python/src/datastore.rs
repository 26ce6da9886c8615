//! Binding of `rest_retriever::datastore`.

use crate::errors::to_py;
use crate::wire::encode_search_response;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyTuple};
use rest_retriever::{Cancel, OpenOptions, Policy, Query, Tree, Watching};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// A tree as Python sees it: `(match_length, occurrences, tokens, parents, counts, cut_count)`,
/// the node arrays as tuples (what `rest.types.SearchResult` holds, so none is copied again).
pub(crate) fn tree_to_py<'py>(py: Python<'py>, t: Tree) -> PyResult<Bound<'py, PyTuple>> {
    (
        t.match_length,
        t.occurrences,
        PyTuple::new(py, t.tokens)?,
        PyTuple::new(py, t.parents)?,
        PyTuple::new(py, t.counts)?,
        t.cut_count,
    )
        .into_pyobject(py)
}

/// Back-off levels as a list of `tree_to_py` tuples.
pub(crate) fn levels_to_py<'py>(py: Python<'py>, trees: Vec<Tree>) -> PyResult<Bound<'py, PyList>> {
    let items = trees.into_iter().map(|t| tree_to_py(py, t)).collect::<PyResult<Vec<_>>>()?;
    PyList::new(py, items)
}

/// A memory-mapped datastore directory.
#[pyclass(frozen, module = "rest._engine")]
pub struct Datastore {
    // Shared with the search executor's worker threads.
    inner: Arc<rest_retriever::Datastore>,
    searched_cache: NamesCache,
}

/// The names of searched shards as a tuple; the usual answer (every shard in service, again and
/// again) comes from here, so that a search does not make its names again.
#[derive(Default)]
struct NamesCache(Mutex<Option<(Vec<usize>, Py<PyTuple>)>>);

impl NamesCache {
    fn names<'py>(
        &self,
        py: Python<'py>,
        store: &rest_retriever::Datastore,
        searched: &[usize],
    ) -> PyResult<Bound<'py, PyTuple>> {
        let mut cache = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((indexes, names)) = cache.as_ref() {
            if indexes.as_slice() == searched {
                return Ok(names.bind(py).clone());
            }
        }
        let names = PyTuple::new(py, store.shard_names_of(searched))?;
        *cache = Some((searched.to_vec(), names.clone().unbind()));
        Ok(names)
    }
}

impl Datastore {
    pub(crate) fn shared(&self) -> Arc<rest_retriever::Datastore> {
        self.inner.clone()
    }

    fn searched_names<'py>(&self, py: Python<'py>, searched: &[usize]) -> PyResult<Bound<'py, PyTuple>> {
        self.searched_cache.names(py, &self.inner, searched)
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
    /// The back-off levels, the requested shards' names joined by commas (empty: every shard),
    /// and the names of the shards the search covered (those in service).
    Levels(Vec<Tree>, String, Vec<String>),
    /// The retrieval service's `SearchResponse`, serialized.
    Wire(Vec<u8>),
}

impl Answer {
    pub(crate) fn new(trees: Vec<Tree>, shards: Option<&[String]>, searched: Vec<String>, as_wire: bool) -> Self {
        let label = shards.map(|s| s.join(",")).unwrap_or_default();
        if as_wire {
            Answer::Wire(encode_search_response(trees, label, searched))
        } else {
            Answer::Levels(trees, label, searched)
        }
    }

    /// `(levels, label, searched shards)` (see `Datastore.search_levels`), or the bytes.
    pub(crate) fn into_py(self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        Ok(match self {
            Answer::Levels(trees, label, searched) => {
                (levels_to_py(py, trees)?, label, PyTuple::new(py, searched)?).into_pyobject(py)?.into_any().unbind()
            }
            Answer::Wire(bytes) => PyBytes::new(py, &bytes).into_any().unbind(),
        })
    }
}

/// The most back-off levels one search may ask for (the retrieval service's cap, too).
pub(crate) const MAX_LEVELS: usize = 16;

pub(crate) fn check_levels(levels: usize) -> PyResult<usize> {
    if (1..=MAX_LEVELS).contains(&levels) {
        Ok(levels)
    } else {
        Err(PyValueError::new_err(format!("levels must be in 1..{MAX_LEVELS}, got {levels}")))
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
        Ok(Datastore { inner: Arc::new(inner), searched_cache: NamesCache::default() })
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

    /// The continuation tree of `context` as `(tree_to_py tuple, searched shards)`.
    #[pyo3(signature = (context, query, shards=None))]
    fn search<'py>(
        &self,
        py: Python<'py>,
        context: Vec<i64>,
        query: QueryArgs,
        shards: Option<Vec<String>>,
    ) -> PyResult<Bound<'py, PyTuple>> {
        let q = query.to_query()?;
        let found = py
            .detach(|| self.inner.search_cancellable(&context, &q, shards.as_deref(), &Cancel::never()))
            .map_err(to_py)?
            .expect("a search that cannot be cancelled always finishes");
        (tree_to_py(py, found.tree)?, self.searched_names(py, &found.searched)?).into_pyobject(py)
    }

    /// The back-off levels of `context` (`rest_retriever::Datastore::search_levels`: at least
    /// one, the first with match length 0 when nothing matched) as `(list of tree_to_py tuples,
    /// searched shards)`.
    #[pyo3(signature = (context, query, levels, shards=None))]
    fn search_levels<'py>(
        &self,
        py: Python<'py>,
        context: Vec<i64>,
        query: QueryArgs,
        levels: usize,
        shards: Option<Vec<String>>,
    ) -> PyResult<Bound<'py, PyTuple>> {
        let q = query.to_query()?;
        let levels = check_levels(levels)?;
        let found = py
            .detach(|| self.inner.search_levels_cancellable(&context, &q, levels, shards.as_deref(), &Cancel::never()))
            .map_err(to_py)?
            .expect("a search that cannot be cancelled always finishes");
        (levels_to_py(py, found.trees)?, self.searched_names(py, &found.searched)?).into_pyobject(py)
    }

    /// `search_levels` as `(levels, shard label, searched shards)`, or the serialized
    /// `SearchResponse` with `as_wire`; None when it has not finished within `time_limit_us`
    /// microseconds. With `session`, searched with what that session remembers.
    #[pyo3(signature = (context, query, shards, time_limit_us, levels=1, as_wire=false, session=None))]
    #[allow(clippy::too_many_arguments)]
    fn try_search(
        &self,
        py: Python<'_>,
        context: Vec<i64>,
        query: QueryArgs,
        shards: Option<Vec<String>>,
        time_limit_us: u64,
        levels: usize,
        as_wire: bool,
        session: Option<&SearchSession>,
    ) -> PyResult<Option<Py<PyAny>>> {
        let q = query.to_query()?;
        let levels = check_levels(levels)?;
        // Capped at a day: a longer limit means none, and must not overflow the clock.
        let stop_at = Instant::now() + Duration::from_micros(time_limit_us.min(86_400_000_000));
        let cancel = Cancel::at(Some(stop_at));
        let answer = py
            .detach(|| {
                let only = shards.as_deref();
                let found = match session {
                    Some(s) => s.lock().search_levels_cancellable(&self.inner, &context, &q, levels, only, &cancel),
                    None => self.inner.search_levels_cancellable(&context, &q, levels, only, &cancel),
                }?;
                Ok(found.map(|found| {
                    let searched = self.inner.shard_names_of(&found.searched);
                    Answer::new(found.trees, only, searched, as_wire)
                }))
            })
            .map_err(to_py)?;
        answer.map(|a| a.into_py(py)).transpose()
    }

    /// The retrieval server's inline search of one `SearchRequest` given as its bytes: decoded
    /// and checked in the engine (`wire::check_search_request`), then `try_search` as wire bytes
    /// with a slice of `slice_per_level_s` per back-off level asked for, never past
    /// `remaining_s`. `None`: a request the checks leave to the Python parser (it refuses it with
    /// its message, or reads it differently); `False`: checked, but not finished within the
    /// slice; else the serialized `SearchResponse`. One call instead of decoding and checking
    /// the request in Python, whose objects cost more than the rest of a call on the server's
    /// event loop.
    #[pyo3(signature = (request, limits, slice_per_level_s, remaining_s, session=None))]
    fn try_search_request(
        &self,
        py: Python<'_>,
        request: &[u8],
        limits: &crate::wire::RequestLimits,
        slice_per_level_s: f64,
        remaining_s: Option<f64>,
        session: Option<&SearchSession>,
    ) -> PyResult<Py<PyAny>> {
        let Some(checked) = crate::wire::check_search_request(request, limits) else {
            return Ok(py.None());
        };
        // As RetrieverServicer.inline_slice_s and Datastore.try_search compute it.
        let slice_s = slice_per_level_s * checked.levels as f64;
        let slice_s = remaining_s.map_or(slice_s, |r| slice_s.min(r));
        let time_limit_us = ((slice_s * 1e6) as u64).min(86_400_000_000);
        let cancel = Cancel::at(Some(Instant::now() + Duration::from_micros(time_limit_us)));
        let answer = py
            .detach(|| {
                let only = checked.shards.as_deref();
                let found = match session {
                    Some(s) => s.lock().search_levels_cancellable(&self.inner, &checked.context, &checked.query, checked.levels, only, &cancel),
                    None => self.inner.search_levels_cancellable(&checked.context, &checked.query, checked.levels, only, &cancel),
                }?;
                Ok(found.map(|found| {
                    let searched = self.inner.shard_names_of(&found.searched);
                    Answer::new(found.trees, only, searched, true)
                }))
            })
            .map_err(to_py)?;
        match answer {
            Some(a) => a.into_py(py),
            None => Ok(false.into_pyobject(py)?.to_owned().into_any().unbind()),
        }
    }

    /// A search session: searches whose contexts extend each other (a decoding session's),
    /// answered with what the last search of the session found (see `SearchSession`).
    fn session(&self) -> SearchSession {
        SearchSession {
            datastore: self.inner.clone(),
            inner: Arc::new(Mutex::new(rest_retriever::SearchSession::new())),
            searched_cache: NamesCache::default(),
        }
    }

    /// Many searches at once, in parallel, without the GIL: `search`'s answer for each.
    #[pyo3(signature = (contexts, query, shards=None))]
    fn search_batch<'py>(
        &self,
        py: Python<'py>,
        contexts: Vec<Vec<i64>>,
        query: QueryArgs,
        shards: Option<Vec<String>>,
    ) -> PyResult<Vec<Bound<'py, PyTuple>>> {
        let q = query.to_query()?;
        let found = py.detach(|| self.inner.search_batch(&contexts, &q, shards.as_deref())).map_err(to_py)?;
        found
            .into_iter()
            .map(|f| (tree_to_py(py, f.tree)?, self.searched_names(py, &f.searched)?).into_pyobject(py))
            .collect()
    }

    /// The slow full check: checksums and suffix-array structure of every open shard.
    fn verify(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| self.inner.verify()).map_err(to_py)
    }
}

/// The searches of one decoding session (`rest_retriever::SearchSession`): each context usually
/// extends the last by the tokens a step accepted, and the session narrows what the last search
/// found instead of searching afresh. Answers equal `Datastore.search_levels`'. One session per
/// decoding session; calls on one session are serialized.
#[pyclass(frozen, module = "rest._engine")]
pub struct SearchSession {
    datastore: Arc<rest_retriever::Datastore>,
    // Shared with the search executor's worker threads, which may run a session's searches.
    inner: Arc<Mutex<rest_retriever::SearchSession>>,
    searched_cache: NamesCache,
}

impl SearchSession {
    pub(crate) fn lock(&self) -> MutexGuard<'_, rest_retriever::SearchSession> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn shared(&self) -> Arc<Mutex<rest_retriever::SearchSession>> {
        self.inner.clone()
    }
}

#[pymethods]
impl SearchSession {
    /// `Datastore.search_levels` of the session's datastore, with what the session remembers:
    /// `(list of tree_to_py tuples, searched shards' names)`.
    #[pyo3(signature = (context, query, levels, shards=None))]
    fn search_levels<'py>(
        &self,
        py: Python<'py>,
        context: Vec<i64>,
        query: QueryArgs,
        levels: usize,
        shards: Option<Vec<String>>,
    ) -> PyResult<Bound<'py, PyTuple>> {
        let q = query.to_query()?;
        let levels = check_levels(levels)?;
        let found = py
            .detach(|| {
                self.lock().search_levels_cancellable(&self.datastore, &context, &q, levels, shards.as_deref(), &Cancel::never())
            })
            .map_err(to_py)?
            .expect("a search that cannot be cancelled always finishes");
        let names = self.searched_cache.names(py, &self.datastore, &found.searched)?;
        (levels_to_py(py, found.trees)?, names).into_pyobject(py)
    }

    /// Forgets what the session remembers.
    fn forget(&self) {
        self.lock().forget();
    }
}
