//! Binding of `rest_retriever::draft`: a generation's drafting in one call per step.

use crate::datastore::{Datastore, QueryArgs};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use rest_retriever::draft::score::ScoreError;
use rest_retriever::draft::{self, Level, LevelCounts, NgramParams, RetrievalParams, Scorer};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

/// A draft tree as Python takes it: (tokens, parents, scores).
type TreeTuple = (Vec<u32>, Vec<i32>, Vec<f64>);

// Scoring refuses malformed levels only, which are a caller's bad input: ValueError.
fn score_error(err: ScoreError) -> PyErr {
    PyValueError::new_err(err.to_string())
}

/// A level as Python passes it: `(match_length, occurrences, trust, tokens, parents, counts)`
/// for a counted trie, `(match_length, occurrences, trust, rows)` for one continuation per
/// occurrence.
#[derive(FromPyObject)]
pub(crate) enum LevelArgs {
    Trie(u32, f64, f64, Vec<i64>, Vec<i64>, Vec<f64>),
    Rows(u32, f64, f64, Vec<Vec<i64>>),
}

impl LevelArgs {
    fn level(&self) -> Level<'_> {
        match self {
            LevelArgs::Trie(m, occurrences, trust, tokens, parents, counts) => Level {
                match_length: *m,
                occurrences: *occurrences,
                trust: *trust,
                counts: LevelCounts::Trie { tokens, parents, counts },
            },
            LevelArgs::Rows(m, occurrences, trust, rows) => Level {
                match_length: *m,
                occurrences: *occurrences,
                trust: *trust,
                counts: LevelCounts::Rows(rows.iter().map(Vec::as_slice).collect()),
            },
        }
    }
}

/// `decoder.config.NgramParams` as `(min_ngram, max_ngram, max_length, max_occurrences, trust)`.
#[derive(FromPyObject)]
struct NgramArgs(usize, usize, usize, usize, f64);

impl NgramArgs {
    fn params(&self) -> PyResult<NgramParams> {
        let NgramArgs(min_ngram, max_ngram, max_length, max_occurrences, trust) = *self;
        if !(1 <= min_ngram && min_ngram <= max_ngram) || max_length < 1 || max_occurrences < 1 || !(trust >= 0.0) {
            return Err(PyValueError::new_err(
                "n-gram parameters need 1 <= min_ngram <= max_ngram, max_length >= 1, max_occurrences >= 1, trust >= 0",
            ));
        }
        Ok(NgramParams { min_ngram, max_ngram, max_length, max_occurrences, trust })
    }
}

/// Scores `levels` into one draft tree of at most `budget` nodes, as
/// `decoder.draft_tree.DraftTree.from_levels` does.
#[pyfunction]
#[pyo3(signature = (levels, budget=None, vocab_size=None))]
pub(crate) fn score_levels(py: Python<'_>, levels: Vec<LevelArgs>, budget: Option<usize>, vocab_size: Option<u64>) -> PyResult<TreeTuple> {
    py.detach(|| {
        let levels: Vec<Level> = levels.iter().map(LevelArgs::level).collect();
        Scorer::new().score(&levels, budget, vocab_size)
    })
    .map(|t| (t.tokens, t.parents, t.scores))
    .map_err(score_error)
}

/// The outputs a generator has served, indexed by n-grams of 1..`max_n` tokens, at most
/// `max_tokens` tokens in `segments` parts (the oldest part dropped first). Shared by the
/// drafters of every generation of one generator.
#[pyclass(frozen, module = "rest._engine")]
pub struct ServedIndex {
    inner: Arc<RwLock<draft::ServedOutputs>>,
}

#[pymethods]
impl ServedIndex {
    #[new]
    #[pyo3(signature = (max_n, max_tokens, segments=4))]
    fn new(max_n: usize, max_tokens: usize, segments: usize) -> PyResult<Self> {
        if max_n < 1 || max_tokens < 1 || segments < 1 {
            return Err(PyValueError::new_err("max_n, max_tokens and segments must be >= 1"));
        }
        Ok(ServedIndex { inner: Arc::new(RwLock::new(draft::ServedOutputs::new(max_n, max_tokens, segments))) })
    }

    /// Remember one served output (its tokens, the prompt left out).
    fn add(&self, py: Python<'_>, output: Vec<i64>) {
        py.detach(|| self.inner.write().unwrap_or_else(|e| e.into_inner()).add(&output));
    }

    fn clear(&self) {
        self.inner.write().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// Tokens held, document separators included.
    #[getter]
    fn tokens(&self) -> usize {
        self.inner.read().unwrap_or_else(|e| e.into_inner()).tokens()
    }

    #[getter]
    fn max_n(&self) -> usize {
        self.inner.read().unwrap_or_else(|e| e.into_inner()).max_n()
    }
}

/// One generation's drafting: the context (indexed as it grows), the served outputs, an
/// in-process datastore's back-off levels and levels given by the caller, scored into one tree
/// per step without the GIL.
#[pyclass(frozen, module = "rest._engine")]
pub struct Drafter {
    inner: Mutex<draft::Drafter>,
    served: Option<Arc<RwLock<draft::ServedOutputs>>>,
    datastore: Option<Arc<rest_retriever::Datastore>>,
}

#[pymethods]
impl Drafter {
    /// `context`, `served_params`: n-gram parameters of the context and served-output sources
    /// (None: no such source). `datastore`, `query`, `levels`, `trust`, `deadline_us`: the
    /// datastore source (`levels` back-off searches with `query`, given up after `deadline_us`
    /// microseconds).
    #[new]
    #[pyo3(signature = (context=None, served=None, served_params=None, datastore=None, query=None, levels=1, trust=0.0, deadline_us=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        context: Option<NgramArgs>,
        served: Option<&ServedIndex>,
        served_params: Option<NgramArgs>,
        datastore: Option<&Datastore>,
        query: Option<QueryArgs>,
        levels: usize,
        trust: f64,
        deadline_us: Option<u64>,
    ) -> PyResult<Self> {
        let context = context.map(|p| p.params()).transpose()?;
        let served_params = match (served, served_params) {
            (Some(index), Some(params)) => {
                let params = params.params()?;
                if params.max_ngram > index.max_n() {
                    return Err(PyValueError::new_err(format!(
                        "the served outputs index n-grams up to {} tokens, not {}",
                        index.max_n(),
                        params.max_ngram
                    )));
                }
                Some(params)
            }
            (None, None) => None,
            _ => return Err(PyValueError::new_err("served and served_params go together")),
        };
        let retrieval = match (datastore, query) {
            (Some(_), Some(query)) => {
                if levels < 1 || !(trust >= 0.0) {
                    return Err(PyValueError::new_err("levels must be >= 1 and trust >= 0"));
                }
                let deadline = deadline_us.map(|us| Duration::from_micros(us.min(86_400_000_000)));
                Some(RetrievalParams { query: query.to_query()?, levels, trust, deadline })
            }
            (None, None) => None,
            _ => return Err(PyValueError::new_err("datastore and query go together")),
        };
        Ok(Drafter {
            inner: Mutex::new(draft::Drafter::new(context, served_params, retrieval)),
            served: served.map(|s| s.inner.clone()),
            datastore: datastore.map(Datastore::shared),
        })
    }

    /// Tokens of context held (what `extend` and `draft` were given since the last reset).
    #[getter]
    fn known(&self) -> usize {
        self.lock().context().len()
    }

    /// Steps whose datastore levels were lost (a failed search, or one past the deadline).
    #[getter]
    fn failures(&self) -> u64 {
        self.lock().failures
    }

    /// Forget the context.
    fn reset(&self) {
        self.lock().reset();
    }

    /// Extends the context by `new_tokens` (its last token is the root), then drafts: every
    /// source's levels and `extra` ones scored into at most `budget` nodes, as
    /// (tokens, parents, scores).
    #[pyo3(signature = (new_tokens, budget=None, vocab_size=None, extra=Vec::new()))]
    fn draft(
        &self,
        py: Python<'_>,
        new_tokens: Vec<i64>,
        budget: Option<usize>,
        vocab_size: Option<u64>,
        extra: Vec<LevelArgs>,
    ) -> PyResult<TreeTuple> {
        py.detach(|| {
            let mut drafter = self.lock();
            drafter.extend(&new_tokens);
            let served = self.served.as_ref().map(|s| s.read().unwrap_or_else(|e| e.into_inner()));
            let extra: Vec<Level> = extra.iter().map(LevelArgs::level).collect();
            drafter.draft(served.as_deref(), self.datastore.as_deref(), &extra, budget, vocab_size)
        })
        .map(|t| (t.tokens, t.parents, t.scores))
        .map_err(score_error)
    }
}

impl Drafter {
    fn lock(&self) -> std::sync::MutexGuard<'_, draft::Drafter> {
        // A panic while drafting leaves nothing half-changed that matters: the next step drafts
        // from what the context holds.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}
