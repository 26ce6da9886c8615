//! Binding of `rest_retriever::scrub`.

use crate::datastore::Datastore;
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::Duration;

/// A background scrub of one datastore (a niced native thread); stopped by `stop` or when
/// collected.
#[pyclass(frozen, module = "rest._engine")]
pub struct Scrub {
    inner: Mutex<Option<rest_retriever::scrub::Scrub>>,
    stats: std::sync::Arc<ScrubCounters>,
}

/// The counters, kept after the scrub stopped.
#[derive(Default)]
struct ScrubCounters {
    bytes: std::sync::atomic::AtomicU64,
    passes: std::sync::atomic::AtomicU64,
    found: std::sync::atomic::AtomicU64,
}

#[pymethods]
impl Scrub {
    /// Starts scrubbing `datastore` at most `bytes_per_s` (0: unlimited), `pause_s` seconds
    /// between passes.
    #[new]
    #[pyo3(signature = (datastore, bytes_per_s, pause_s=10.0))]
    fn new(datastore: &Datastore, bytes_per_s: u64, pause_s: f64) -> PyResult<Self> {
        let pause = Duration::try_from_secs_f64(pause_s.max(0.0)).unwrap_or(Duration::MAX);
        let scrub = rest_retriever::scrub::Scrub::start(datastore.shared(), bytes_per_s, pause)
            .map_err(|e| PyRuntimeError::new_err(format!("scrub: {e}")))?;
        Ok(Scrub { inner: Mutex::new(Some(scrub)), stats: Default::default() })
    }

    /// `(bytes read, passes completed, shards taken out of service)` so far.
    fn stats(&self) -> (u64, u64, u64) {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(scrub) = inner.as_ref() {
            let s = scrub.stats();
            self.stats.bytes.store(s.bytes.load(Ordering::Relaxed), Ordering::Relaxed);
            self.stats.passes.store(s.passes.load(Ordering::Relaxed), Ordering::Relaxed);
            self.stats.found.store(s.found.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        let s = &self.stats;
        (s.bytes.load(Ordering::Relaxed), s.passes.load(Ordering::Relaxed), s.found.load(Ordering::Relaxed))
    }

    /// Stops the scrub and waits for its thread (at most one nap, 50 ms).
    fn stop(&self, py: Python<'_>) {
        self.stats();
        let scrub = self.inner.lock().unwrap_or_else(|e| e.into_inner()).take();
        py.detach(move || drop(scrub));
    }
}
