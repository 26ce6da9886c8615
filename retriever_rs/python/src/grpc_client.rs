//! The retrieval client's native streams: `rest.retriever.v1.Retriever/SearchStream` driven by
//! tonic on a tokio thread of the client's process, for `retriever_service.client`.
//!
//! Through gRPC Python's blocking API a search costs the client three thread hand-offs, each
//! taking the GIL: the thread that drains the request iterator, the channel's polling thread,
//! and the stream's reader thread, before the step's own thread wakes. Here the request goes
//! onto the HTTP/2 stream from a tokio thread that never takes the GIL, the answer is handed to
//! the step's `Mailbox` there, and the step's thread, waiting in `Mailbox.take` with the GIL
//! released, is the only one that wakes in Python. The client keeps every decision (which
//! replica, failover, hedging, what an answer or an error means): this module only moves bytes
//! and tells which search each answer or failure belongs to (the server answers in order).
//!
//! An answer or failure whose step is over (the step gave the search up, or another replica
//! answered first) goes to the stream's `on_late` callback instead, on a blocking thread that
//! takes the GIL: the rare path. No lock of this module is held while the GIL is taken.

use crate::grpc::RawCodec;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyTuple};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Notify};
use tonic::codegen::{http, Bytes};
use tonic::metadata::{MetadataKey, MetadataValue};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

const STREAM_PATH: &str = "/rest.retriever.v1.Retriever/SearchStream";
/// A stream that ended without this client ending it or a gRPC status (the server closed it
/// with searches unanswered): `retriever_service.client` reads it as a connection error.
const ENDED: i32 = -1;

/// The one runtime of every native stream in the process: one thread, which only moves bytes.
fn runtime() -> PyResult<&'static tokio::runtime::Runtime> {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    if let Some(runtime) = RUNTIME.get() {
        return Ok(runtime);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("search-client")
        .enable_all()
        .build()
        .map_err(|e| PyRuntimeError::new_err(format!("search client runtime: {e}")))?;
    Ok(RUNTIME.get_or_init(|| runtime))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------------------------
// Where a step waits for its outcomes.

enum Item {
    /// `(attempt, outcome)` put by Python (a gRPC Python stream's reader thread).
    Put(Py<PyAny>, Py<PyAny>),
    /// A native stream's answer to `attempt`: the serialized `SearchResponse`.
    Answer(Py<PyAny>, Bytes),
    /// A native stream's failure for `attempt`: a gRPC status code (or `ENDED`) and message.
    Failed(Py<PyAny>, i32, String),
}

#[derive(Default)]
struct Slots {
    items: VecDeque<Item>,
    closed: bool,
}

#[derive(Default)]
struct MailboxInner {
    slots: Mutex<Slots>,
    ready: Condvar,
}

impl MailboxInner {
    /// Hands `item` over; gives it back when the step is over.
    fn deliver(&self, item: Item) -> Result<(), Item> {
        let mut slots = lock(&self.slots);
        if slots.closed {
            return Err(item);
        }
        slots.items.push_back(item);
        drop(slots);
        self.ready.notify_one();
        Ok(())
    }
}

/// The outcomes of one step's searches, from every stream the step sent to. `take` returns
/// `(attempt, kind, payload)` triples: kind 0, the outcome Python `put`; kind 1, an answer's
/// bytes; kind 2, a failure's `(code, message)` (code -1: the stream ended without a status).
#[pyclass(frozen, module = "rest._engine")]
pub struct Mailbox {
    inner: Arc<MailboxInner>,
}

#[pymethods]
impl Mailbox {
    #[new]
    fn new() -> Self {
        Mailbox { inner: Arc::new(MailboxInner::default()) }
    }

    /// Hands `outcome` for `attempt` over; `False` when the step is over.
    fn put(&self, attempt: Py<PyAny>, outcome: Py<PyAny>) -> bool {
        self.inner.deliver(Item::Put(attempt, outcome)).is_ok()
    }

    /// Everything delivered so far, waiting up to `timeout_s` (with the GIL released) for a
    /// first item.
    fn take<'py>(&self, py: Python<'py>, timeout_s: f64) -> PyResult<Bound<'py, PyList>> {
        let inner = self.inner.clone();
        let items: Vec<Item> = py.detach(move || {
            let mut slots = lock(&inner.slots);
            if slots.items.is_empty() && timeout_s > 0.0 {
                let until = Instant::now() + Duration::try_from_secs_f64(timeout_s).unwrap_or(Duration::from_secs(86_400));
                while slots.items.is_empty() {
                    let now = Instant::now();
                    if now >= until {
                        break;
                    }
                    slots = inner.ready.wait_timeout(slots, until - now).unwrap_or_else(|e| e.into_inner()).0;
                }
            }
            slots.items.drain(..).collect()
        });
        triples(py, items)
    }

    /// Ends the step: nothing more is delivered. Returns what was delivered and not taken.
    fn close<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let items: Vec<Item> = {
            let mut slots = lock(&self.inner.slots);
            slots.closed = true;
            slots.items.drain(..).collect()
        };
        triples(py, items)
    }
}

fn triple<'py>(py: Python<'py>, item: Item) -> PyResult<Bound<'py, PyTuple>> {
    match item {
        Item::Put(attempt, outcome) => (attempt, 0, outcome).into_pyobject(py),
        Item::Answer(attempt, data) => (attempt, 1, PyBytes::new(py, &data)).into_pyobject(py),
        Item::Failed(attempt, code, message) => (attempt, 2, (code, message)).into_pyobject(py),
    }
}

fn triples<'py>(py: Python<'py>, items: Vec<Item>) -> PyResult<Bound<'py, PyList>> {
    let list = PyList::empty(py);
    for item in items {
        list.append(triple(py, item)?)?;
    }
    Ok(list)
}

// ---------------------------------------------------------------------------------------------
// A channel to one server, and its streams.

/// A connection to one server (`host:port`), made on first use and again after it fails.
/// `tls`: `(CA PEM, client certificate PEM or None, client key PEM or None, server name or None)`.
#[pyclass(frozen, module = "rest._engine")]
pub struct NativeSearchChannel {
    channel: Channel,
    max_message_bytes: usize,
}

type ClientTls = (Vec<u8>, Option<Vec<u8>>, Option<Vec<u8>>, Option<String>);

#[pymethods]
impl NativeSearchChannel {
    #[new]
    #[pyo3(signature = (address, *, max_message_bytes, keepalive_time_s, connect_timeout_s, tls=None))]
    fn new(
        address: &str,
        max_message_bytes: usize,
        keepalive_time_s: f64,
        connect_timeout_s: f64,
        tls: Option<ClientTls>,
    ) -> PyResult<Self> {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let bad = |e: &dyn std::fmt::Display| PyValueError::new_err(format!("search channel to {address}: {e}"));
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{address}"))
            .map_err(|e| bad(&e))?
            .tcp_nodelay(true)
            .connect_timeout(Duration::try_from_secs_f64(connect_timeout_s).map_err(|e| bad(&e))?)
            .http2_keep_alive_interval(Duration::try_from_secs_f64(keepalive_time_s).map_err(|e| bad(&e))?)
            .keep_alive_timeout(Duration::from_secs(20));
        if let Some((ca, cert, key, server_name)) = tls {
            let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
            match (cert, key) {
                (Some(cert), Some(key)) => config = config.identity(Identity::from_pem(cert, key)),
                (None, None) => {}
                _ => return Err(bad(&"mutual TLS needs both a certificate and a key")),
            }
            if let Some(name) = server_name {
                config = config.domain_name(name);
            }
            endpoint = endpoint.tls_config(config).map_err(|e| bad(&e))?;
        }
        let _entered = runtime()?.enter(); // the channel's worker task is spawned on it
        Ok(NativeSearchChannel { channel: endpoint.connect_lazy(), max_message_bytes })
    }

    /// Opens a `SearchStream` with `metadata` (`(key, value)` pairs). `on_late(attempt, data,
    /// code, message)` gets what arrives after its step is over (`data` `None` for a failure).
    fn open_stream(&self, metadata: Vec<(String, String)>, on_late: Py<PyAny>) -> PyResult<NativeSearchStream> {
        let mut headers = tonic::metadata::MetadataMap::new();
        for (key, value) in metadata {
            let name = MetadataKey::from_bytes(key.as_bytes())
                .map_err(|_| PyValueError::new_err(format!("metadata key {key:?} is not valid")))?;
            let value = MetadataValue::try_from(value.as_str())
                .map_err(|_| PyValueError::new_err(format!("metadata value for {key:?} is not valid")))?;
            headers.insert(name, value);
        }
        let shared = Arc::new(StreamShared {
            pending: Mutex::new(Pending::default()),
            cancel: Notify::new(),
            cancelled: AtomicBool::new(false),
            on_late,
        });
        let (sender, requests) = mpsc::unbounded_channel::<Bytes>();
        let task = run_stream(self.channel.clone(), self.max_message_bytes, headers, requests, shared.clone());
        runtime()?.spawn(task);
        Ok(NativeSearchStream { shared, sender: Mutex::new(Some(sender)) })
    }
}

#[derive(Default)]
struct Pending {
    /// The searches sent and not answered, oldest first, with the mailbox of each one's step.
    searches: VecDeque<(Arc<MailboxInner>, Py<PyAny>)>,
    /// Why the stream ended (`None` while it runs).
    ended: Option<(i32, String)>,
}

struct StreamShared {
    pending: Mutex<Pending>,
    cancel: Notify,
    cancelled: AtomicBool,
    on_late: Py<PyAny>,
}

impl StreamShared {
    fn hand_over(self: &Arc<Self>, mailbox: &MailboxInner, item: Item) {
        if let Err(item) = mailbox.deliver(item) {
            let shared = self.clone();
            // The GIL is taken off the runtime's thread, which keeps moving other streams' bytes.
            tokio::task::spawn_blocking(move || {
                Python::attach(|py| {
                    let args = match item {
                        Item::Answer(attempt, data) => (attempt, Some(PyBytes::new(py, &data).unbind()), 0, String::new()),
                        Item::Failed(attempt, code, message) => (attempt, None, code, message),
                        Item::Put(..) => return,
                    };
                    if let Err(e) = shared.on_late.call1(py, args) {
                        e.print(py);
                    }
                })
            });
        }
    }

    /// The stream is over: every search still pending fails with `code` and `message`.
    fn end(self: &Arc<Self>, code: i32, message: String) {
        let searches: Vec<_> = {
            let mut pending = lock(&self.pending);
            if pending.ended.is_none() {
                pending.ended = Some((code, message.clone()));
            }
            pending.searches.drain(..).collect()
        };
        for (mailbox, attempt) in searches {
            self.hand_over(&mailbox, Item::Failed(attempt, code, message.clone()));
        }
    }
}

async fn run_stream(
    channel: Channel,
    max_message_bytes: usize,
    headers: tonic::metadata::MetadataMap,
    requests: mpsc::UnboundedReceiver<Bytes>,
    shared: Arc<StreamShared>,
) {
    let exchange = async {
        let mut grpc = tonic::client::Grpc::new(channel)
            .max_decoding_message_size(usize::MAX) // checked by the codec, as grpc core does
            .max_encoding_message_size(max_message_bytes);
        grpc.ready().await.map_err(|e| tonic::Status::unavailable(format!("connection: {e}")))?;
        let mut request = tonic::Request::new(tokio_stream::wrappers::UnboundedReceiverStream::new(requests));
        *request.metadata_mut() = headers;
        let path = http::uri::PathAndQuery::from_static(STREAM_PATH);
        let codec = RawCodec { max_message_bytes, side: "" };
        let mut answers = grpc.streaming(request, path, codec).await?.into_inner();
        while let Some(data) = answers.message().await? {
            let next = lock(&shared.pending).searches.pop_front();
            let Some((mailbox, attempt)) = next else {
                return Err(tonic::Status::internal("an answer to no request"));
            };
            shared.hand_over(&mailbox, Item::Answer(attempt, data));
        }
        Ok::<(), tonic::Status>(())
    };
    let (code, message) = tokio::select! {
        outcome = exchange => match outcome {
            Ok(()) => (ENDED, "the server ended the stream".to_string()),
            Err(status) => (status.code() as i32, status.message().to_string()),
        },
        _ = shared.cancel.notified() => (tonic::Code::Cancelled as i32, "cancelled by the client".to_string()),
    };
    shared.end(code, message);
}

/// One `SearchStream`: `send` searches, each answered to the mailbox it was sent with.
#[pyclass(frozen, module = "rest._engine")]
pub struct NativeSearchStream {
    shared: Arc<StreamShared>,
    sender: Mutex<Option<mpsc::UnboundedSender<Bytes>>>,
}

#[pymethods]
impl NativeSearchStream {
    /// Sends a serialized `SearchRequest` for `attempt`, whose outcome goes to `mailbox`;
    /// `False` when the stream has ended (nothing was sent).
    fn send(&self, request: &[u8], mailbox: &Mailbox, attempt: Py<PyAny>) -> bool {
        let mut pending = lock(&self.shared.pending);
        if pending.ended.is_some() {
            return false;
        }
        let sender = lock(&self.sender);
        let Some(sender) = sender.as_ref() else { return false };
        if sender.send(Bytes::copy_from_slice(request)).is_err() {
            return false; // the stream's task is over; it records why
        }
        pending.searches.push_back((mailbox.inner.clone(), attempt));
        true
    }

    /// Searches sent and not answered yet.
    fn pending(&self) -> usize {
        lock(&self.shared.pending).searches.len()
    }

    /// Why the stream ended, `(code, message)`, or `None` while it runs.
    fn ended(&self) -> Option<(i32, String)> {
        lock(&self.shared.pending).ended.clone()
    }

    /// Half-closes the stream (the server answers what it was sent, then ends it), or with
    /// `cancel` ends it now: what is still pending fails as CANCELLED.
    fn close(&self, cancel: bool) {
        lock(&self.sender).take();
        if cancel && !self.shared.cancelled.swap(true, Ordering::SeqCst) {
            self.shared.cancel.notify_one(); // stored if the task is not waiting yet
        }
    }
}
