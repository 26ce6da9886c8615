//! Searches on native worker threads, with completions announced on a file descriptor.
//!
//! The retrieval server runs on an asyncio event loop and must not block it with a search. Handing
//! a search to a Python worker thread costs two GIL hand-offs per call (the worker takes the GIL
//! to start the call and again to post the result back), which on a small host cost more than the
//! search itself. Here the loop thread converts the request once and queues it; a native worker
//! searches without ever touching the GIL, queues the result and writes one byte to a socket the
//! event loop watches (`loop.add_reader`); the loop then collects every finished search at once.

use crate::datastore::{check_levels, Answer, Datastore, QueryArgs, SearchSession};
use crate::errors::to_py;
use pyo3::exceptions::{PyRuntimeError, PyTimeoutError};
use pyo3::prelude::*;
use rest_retriever::{Cancel, Error, Query, SearchSession as CoreSession};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

struct Job {
    tag: u64,
    context: Vec<i64>,
    query: Query,
    shards: Option<Vec<String>>,
    deadline: Option<Instant>,
    /// Set by `SearchExecutor.cancel`: the search stops at its next check.
    cancelled: Arc<AtomicBool>,
    levels: usize,
    /// Searched with what this session remembers.
    session: Option<Arc<Mutex<CoreSession>>>,
}

enum Outcome {
    /// Made on the worker, the encoding (`as_wire`) included.
    Found(Answer),
    Failed(Error),
    /// The deadline passed while the job waited for a worker: not searched.
    Expired,
    /// The deadline passed during the search, or the caller cancelled it: given up.
    GivenUp,
}

/// Finished jobs, and the wake-up socket that tells the event loop there are some.
struct Completions {
    done: Mutex<Vec<(u64, Outcome)>>,
    /// A byte was written and not yet drained: later completions need not write another.
    wake_pending: AtomicBool,
    wake_writer: UnixStream,
}

impl Completions {
    fn push(&self, tag: u64, outcome: Outcome) {
        self.done.lock().unwrap_or_else(|e| e.into_inner()).push((tag, outcome));
        if !self.wake_pending.swap(true, Ordering::AcqRel) {
            // Non-blocking: a full socket buffer already holds a wake-up, which is all it takes.
            let _ = (&self.wake_writer).write(&[1]);
        }
    }
}

/// Runs searches of one datastore on `workers` native threads.
#[pyclass(frozen, module = "rest._engine")]
pub struct SearchExecutor {
    jobs: Mutex<Option<Sender<Job>>>,
    completions: Arc<Completions>,
    wake_reader: UnixStream,
    /// The cancel flags of the jobs not yet completed, by tag.
    in_flight: Arc<Mutex<HashMap<u64, Arc<AtomicBool>>>>,
}

#[pymethods]
impl SearchExecutor {
    /// `as_wire`: outcomes are serialized `rest.retriever.v1.SearchResponse` messages (bytes)
    /// instead of result tuples.
    #[new]
    #[pyo3(signature = (datastore, workers, as_wire=false))]
    fn new(datastore: &Datastore, workers: usize, as_wire: bool) -> PyResult<Self> {
        if workers == 0 {
            return Err(pyo3::exceptions::PyValueError::new_err("workers must be >= 1"));
        }
        let (wake_reader, wake_writer) = UnixStream::pair().map_err(os_error)?;
        wake_reader.set_nonblocking(true).map_err(os_error)?;
        wake_writer.set_nonblocking(true).map_err(os_error)?;
        let completions = Arc::new(Completions {
            done: Mutex::new(Vec::new()),
            wake_pending: AtomicBool::new(false),
            wake_writer,
        });
        let (sender, receiver) = channel::<Job>();
        let receiver = Arc::new(Mutex::new(receiver));
        let in_flight = Arc::new(Mutex::new(HashMap::new()));
        for i in 0..workers {
            let (store, receiver, completions, in_flight) =
                (datastore.shared(), receiver.clone(), completions.clone(), in_flight.clone());
            thread::Builder::new()
                .name(format!("search-{i}"))
                .spawn(move || work(&store, &receiver, &completions, &in_flight, as_wire))
                .map_err(os_error)?;
        }
        Ok(SearchExecutor { jobs: Mutex::new(Some(sender)), completions, wake_reader, in_flight })
    }

    /// The file descriptor that becomes readable when searches have finished.
    fn fileno(&self) -> i32 {
        self.wake_reader.as_raw_fd()
    }

    /// Queues a search of `levels` back-off levels (`Datastore.search_levels`), with what
    /// `session` remembers when one is given; its outcome comes back from `completed` under
    /// `tag`. A job still waiting for a worker `timeout_s` seconds from now is not searched, and
    /// one still running then is given up (both `TimeoutError`).
    #[pyo3(signature = (tag, context, query, shards=None, timeout_s=None, levels=1, session=None))]
    #[allow(clippy::too_many_arguments)]
    fn submit(
        &self,
        tag: u64,
        context: Vec<i64>,
        query: QueryArgs,
        shards: Option<Vec<String>>,
        timeout_s: Option<f64>,
        levels: usize,
        session: Option<&SearchSession>,
    ) -> PyResult<()> {
        let query = query.to_query()?;
        let levels = check_levels(levels)?;
        let session = session.map(SearchSession::shared);
        // No deadline for one too far away to represent; NaN counts as 0.
        let deadline = timeout_s
            .and_then(|t| Duration::try_from_secs_f64(t.max(0.0)).ok())
            .and_then(|d| Instant::now().checked_add(d));
        let cancelled = Arc::new(AtomicBool::new(false));
        self.in_flight.lock().unwrap_or_else(|e| e.into_inner()).insert(tag, cancelled.clone());
        let job = Job { tag, context, query, shards, deadline, cancelled, levels, session };
        let jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        match jobs.as_ref() {
            Some(sender) if sender.send(job).is_ok() => Ok(()),
            _ => {
                self.in_flight.lock().unwrap_or_else(|e| e.into_inner()).remove(&tag);
                Err(PyRuntimeError::new_err("search executor is closed"))
            }
        }
    }

    /// Gives up the search queued under `tag` (its caller went away): a queued one is not run,
    /// a running one stops at its next check. Its outcome still comes back from `completed`.
    /// Unknown or finished tags are ignored.
    fn cancel(&self, tag: u64) {
        if let Some(flag) = self.in_flight.lock().unwrap_or_else(|e| e.into_inner()).get(&tag) {
            flag.store(true, Ordering::Relaxed);
        }
    }

    /// Every search finished since the last call, as `(tag, outcome)`: the outcome is
    /// `(levels, shard label, searched shards)` as `Datastore.try_search` gives it (the encoded
    /// message with `as_wire`), or the exception the search raised (`TimeoutError` for one whose
    /// deadline passed before it started, or that was given up).
    fn completed(&self, py: Python<'_>) -> Vec<(u64, Py<PyAny>)> {
        // Drain the wake-up bytes before taking the list: a completion that lands after the take
        // then writes a fresh byte, so none is ever left without a wake-up.
        let mut buf = [0u8; 256];
        while matches!((&self.wake_reader).read(&mut buf), Ok(n) if n > 0) {}
        self.completions.wake_pending.store(false, Ordering::Release);
        let done = std::mem::take(&mut *self.completions.done.lock().unwrap_or_else(|e| e.into_inner()));
        done.into_iter()
            .map(|(tag, outcome)| {
                let value = match outcome {
                    Outcome::Found(answer) => answer.into_py(py),
                    Outcome::Failed(err) => Ok(to_py(err).into_value(py).into_any()),
                    Outcome::Expired => Ok(PyTimeoutError::new_err(
                        "deadline passed before the search started; not searched",
                    )
                    .into_value(py)
                    .into_any()),
                    Outcome::GivenUp => Ok(PyTimeoutError::new_err(
                        "search given up: its deadline passed or its call was cancelled",
                    )
                    .into_value(py)
                    .into_any()),
                };
                (tag, value.expect("converting a search result cannot fail"))
            })
            .collect()
    }

    /// Refuses further jobs; the workers finish the queued ones and exit.
    fn close(&self) {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}

fn work(
    store: &rest_retriever::Datastore,
    receiver: &Mutex<Receiver<Job>>,
    completions: &Completions,
    in_flight: &Mutex<HashMap<u64, Arc<AtomicBool>>>,
    as_wire: bool,
) {
    loop {
        // One worker waits on the channel while the others wait on the lock: a plain shared queue.
        let job = match receiver.lock().unwrap_or_else(|e| e.into_inner()).recv() {
            Ok(job) => job,
            Err(_) => return, // closed and drained
        };
        let outcome = if job.deadline.is_some_and(|d| Instant::now() >= d) {
            Outcome::Expired
        } else if job.cancelled.load(Ordering::Relaxed) {
            Outcome::GivenUp
        } else {
            let cancel = Cancel::at(job.deadline).with_flag(job.cancelled.clone());
            let only = job.shards.as_deref();
            let found = match &job.session {
                Some(session) => session.lock().unwrap_or_else(|e| e.into_inner()).search_levels_cancellable(
                    store, &job.context, &job.query, job.levels, only, &cancel,
                ),
                None => store.search_levels_cancellable(&job.context, &job.query, job.levels, only, &cancel),
            };
            match found {
                Ok(Some(found)) => {
                    let searched = store.shard_names_of(&found.searched);
                    Outcome::Found(Answer::new(found.trees, only, searched, as_wire))
                }
                Ok(None) => Outcome::GivenUp,
                Err(err) => Outcome::Failed(err),
            }
        };
        in_flight.lock().unwrap_or_else(|e| e.into_inner()).remove(&job.tag);
        completions.push(job.tag, outcome);
    }
}

fn os_error(err: std::io::Error) -> PyErr {
    PyRuntimeError::new_err(format!("search executor: {err}"))
}
