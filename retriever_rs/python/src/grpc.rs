//! The retrieval server's native search port: `rest.retriever.v1.Retriever/Search`,
//! `/SearchStream` and `/Info` served by tonic on tokio threads of the server's process.
//!
//! The Python server (grpc.aio) keeps the control plane; this port answers the searches with no
//! Python and no GIL on the path of an accepted request: the request's bytes are checked by
//! `wire::check_search_request` (the checks of `retriever_service.validation`, mirrored), the
//! search runs on the runtime's thread and the response is encoded by
//! `wire::encode_search_response`, as the Python port's inline path does. Everything else takes
//! the GIL on a rare path and asks the Python servicer (`fallback`), so that both ports answer
//! alike: a request the engine's checks leave to `SearchRequestParser` (refused with its status
//! and message, or parsed and searched here), and an engine error (`engine_error`).
//! Requests and responses travel as raw bytes (`RawCodec`): no generated code, no protoc.

use crate::datastore::{Datastore, MAX_LEVELS};
use crate::errors::to_py;
use crate::wire::{check_search_request, encode_search_response, CheckedRequest, RequestLimits};
use pyo3::exceptions::{PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList};
use rest_retriever::{Cancel, Policy, Query, SearchSession};
use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::{http, BoxFuture, Bytes, Context, Poll, Service, StdError};
use tonic::{Code, Status};

const SERVICE: &str = "rest.retriever.v1.Retriever";
const UNAUTHENTICATED: &str = "missing or wrong bearer token: send metadata 'authorization: Bearer <token>'";
const DEADLINE: &str = "deadline passed before the search started; not searched";
/// `retriever_service.telemetry.LATENCY_BUCKETS_S`.
const LATENCY_BUCKETS_S: [f64; 19] = [
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
    0.5, 1.0, 2.5, 5.0, 10.0,
];

// ---------------------------------------------------------------------------------------------
// Raw bytes on the wire, with the server's message limit checked as grpc core checks it.

#[derive(Clone)]
pub(crate) struct RawCodec {
    pub(crate) max_message_bytes: usize,
    /// How grpc core's message for the limit starts on this side ("SERVER: " or "").
    pub(crate) side: &'static str,
}

pub(crate) struct RawEncoder;
pub(crate) struct RawDecoder {
    max_message_bytes: usize,
    side: &'static str,
}

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder { max_message_bytes: self.max_message_bytes, side: self.side }
    }
}

impl Encoder for RawEncoder {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        use bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Bytes;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        use bytes::Buf;
        let n = src.remaining();
        if n > self.max_message_bytes {
            // grpc core's status and message for the same limit (on the Python port, or in a
            // gRPC Python client).
            return Err(Status::resource_exhausted(format!(
                "{}Received message larger than max ({n} vs. {})",
                self.side, self.max_message_bytes
            )));
        }
        Ok(Some(src.copy_to_bytes(n)))
    }
}

// ---------------------------------------------------------------------------------------------
// Counters, read by the Python telemetry (`NativeSearchServer.stats`).

#[derive(Default)]
struct Histogram {
    buckets: [u64; LATENCY_BUCKETS_S.len() + 1],
    sum: f64,
    count: u64,
}

#[derive(Default)]
struct Stats {
    requests: HashMap<&'static str, u64>,
    errors: HashMap<(&'static str, &'static str), u64>,
    rejections: HashMap<&'static str, u64>,
    latency: HashMap<(&'static str, &'static str), Histogram>,
}

impl Stats {
    fn search(&mut self, method: &'static str, latency_s: f64, error: Option<Code>) {
        *self.requests.entry(method).or_default() += 1;
        if let Some(code) = error {
            *self.errors.entry((method, code_name(code))).or_default() += 1;
        }
        let h = self.latency.entry((method, if error.is_some() { "error" } else { "ok" })).or_default();
        let i = LATENCY_BUCKETS_S.iter().position(|&b| latency_s <= b).unwrap_or(LATENCY_BUCKETS_S.len());
        h.buckets[i] += 1;
        h.sum += latency_s;
        h.count += 1;
    }
}

/// Python's `grpc.StatusCode` names.
fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

// ---------------------------------------------------------------------------------------------
// What the endpoint serves, swapped on a reload.

struct Serving {
    store: Arc<rest_retriever::Datastore>,
    limits: Arc<RequestLimits>,
    info: Bytes,
}

struct Shared {
    serving: RwLock<Arc<Serving>>,
    /// The Python servicer: `native_parse(bytes)` and `native_engine_error(exc)`.
    fallback: Py<PyAny>,
    /// `b"Bearer <token>"`, when the server requires one.
    expected_auth: Option<Vec<u8>>,
    max_in_flight: usize,
    in_flight: AtomicUsize,
    max_message_bytes: usize,
    /// How long a search runs on a runtime thread, per back-off level, before `block_in_place`.
    inline_slice: Duration,
    stats: Mutex<Stats>,
}

/// `RetrieverServicer.native_parse`'s answer for a request it accepts:
/// `("search", context, (min_span, max_span, budget, max_depth, policy), shards, levels)`.
type Parsed = (String, Vec<i64>, (usize, usize, usize, usize, String), Option<Vec<String>>, usize);

/// `(certificate PEM, key PEM, client CA PEM)`.
type TlsFiles = (Vec<u8>, Vec<u8>, Option<Vec<u8>>);

fn status(code: i32, message: String) -> Status {
    Status::new(Code::from_i32(code), message)
}

/// Equal without telling, by the time taken, how much of `given` was right (hmac.compare_digest).
fn same_bytes(given: &[u8], expected: &[u8]) -> bool {
    if given.len() != expected.len() {
        return false;
    }
    given.iter().zip(expected).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

/// The `grpc-timeout` header as an instant (None: no deadline, or one too far to represent).
fn deadline_of(headers: &http::HeaderMap) -> Option<Instant> {
    let value = headers.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    let timeout = match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    };
    Instant::now().checked_add(timeout)
}

impl Shared {
    fn serving(&self) -> Arc<Serving> {
        self.serving.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn reject(&self, reason: &'static str) {
        *self.stats.lock().unwrap_or_else(|e| e.into_inner()).rejections.entry(reason).or_default() += 1;
    }

    fn authorized(&self, headers: &http::HeaderMap) -> Result<(), Status> {
        let Some(expected) = &self.expected_auth else { return Ok(()) };
        match headers.get("authorization") {
            Some(given) if same_bytes(given.as_bytes(), expected) => Ok(()),
            _ => {
                self.reject("unauthenticated");
                Err(Status::unauthenticated(UNAUTHENTICATED))
            }
        }
    }

    /// The request checked: by the engine, or else (with the GIL) by the Python parser, which
    /// refuses it with its status and message or hands back what it parsed.
    fn parse(&self, serving: &Serving, data: &[u8]) -> Result<CheckedRequest, Status> {
        if let Some(checked) = check_search_request(data, &serving.limits) {
            return Ok(checked);
        }
        Python::attach(|py| {
            let answer = self
                .fallback
                .call_method1(py, "native_parse", (PyBytes::new(py, data),))
                .map_err(|e| Status::internal(format!("request check failed: {e}")))?;
            let answer = answer.bind(py);
            let kind: String = answer.get_item(0).and_then(|k| k.extract()).map_err(internal)?;
            if kind == "refuse" {
                let (_, code, message): (String, i32, String) = answer.extract().map_err(internal)?;
                return Err(status(code, message));
            }
            let (_, context, (min_span, max_span, budget, max_depth, policy), shards, levels): Parsed =
                answer.extract().map_err(internal)?;
            let policy: Policy = policy.parse().map_err(|e| Status::internal(format!("{e}")))?;
            if !(1..=MAX_LEVELS).contains(&levels) {
                return Err(Status::internal(format!("levels {levels} out of range")));
            }
            Ok(CheckedRequest { context, query: Query { min_span, max_span, budget, max_depth, policy }, shards, levels })
        })
    }

    /// One search request answered, as `RetrieverServicer._search` answers it: checks, the
    /// deadline, the concurrency limit, then the search (in `session` for a stream).
    fn answer(
        &self,
        method: &'static str,
        data: &[u8],
        deadline: Option<Instant>,
        session: Option<&mut (Option<Arc<rest_retriever::Datastore>>, SearchSession)>,
    ) -> Result<Bytes, Status> {
        let start = Instant::now();
        let result = self.answer_inner(data, deadline, session);
        let error = result.as_ref().err().map(Status::code);
        self.stats.lock().unwrap_or_else(|e| e.into_inner()).search(method, start.elapsed().as_secs_f64(), error);
        result
    }

    fn answer_inner(
        &self,
        data: &[u8],
        deadline: Option<Instant>,
        session: Option<&mut (Option<Arc<rest_retriever::Datastore>>, SearchSession)>,
    ) -> Result<Bytes, Status> {
        let serving = self.serving();
        let search = self.parse(&serving, data)?;
        if deadline.is_some_and(|d| Instant::now() >= d) {
            self.reject("deadline");
            return Err(Status::deadline_exceeded(DEADLINE));
        }
        let admitted = self.in_flight.fetch_add(1, Ordering::AcqRel);
        let _admission = InFlight(&self.in_flight);
        if admitted >= self.max_in_flight {
            self.reject("overloaded");
            return Err(Status::resource_exhausted(format!(
                "server busy: {admitted} searches in flight (limit {}); retry later or on another replica",
                self.max_in_flight
            )));
        }
        let store = &serving.store;
        let only = search.shards.as_deref();
        let mut session = session.map(|(searched_in, session)| {
            // A reload: what the session remembers belongs to the previous datastore.
            if !searched_in.as_ref().is_some_and(|s| Arc::ptr_eq(s, store)) {
                session.forget();
                *searched_in = Some(store.clone());
            }
            session
        });
        let mut run = |cancel: &Cancel| match session.as_deref_mut() {
            Some(session) => {
                session.search_levels_cancellable(store, &search.context, &search.query, search.levels, only, cancel)
            }
            None => store.search_levels_cancellable(&search.context, &search.query, search.levels, only, cancel),
        };
        // Most searches take microseconds: run on this runtime thread for a bounded slice per
        // back-off level (as the Python port's inline slice). A longer one goes on in
        // `block_in_place`, which hands this thread's other tasks (and its queue) to another
        // thread first, so that it holds up no other call.
        let slice_end = Instant::now() + self.inline_slice.saturating_mul(search.levels as u32);
        let found = match run(&Cancel::at(Some(deadline.map_or(slice_end, |d| d.min(slice_end))))) {
            Ok(None) if deadline.is_none_or(|d| Instant::now() < d) => {
                tokio::task::block_in_place(|| run(&Cancel::at(deadline)))
            }
            found => found,
        };
        match found {
            Ok(Some(found)) => {
                let searched = store.shard_names_of(&found.searched);
                let label = search.shards.map(|s| s.join(",")).unwrap_or_default();
                Ok(Bytes::from(encode_search_response(found.trees, label, searched)))
            }
            Ok(None) => {
                self.reject("deadline");
                Err(Status::deadline_exceeded(DEADLINE))
            }
            Err(err) => Err(Python::attach(|py| {
                let exc = to_py(err).into_value(py);
                match self.fallback.call_method1(py, "native_engine_error", (exc,)).and_then(|r| r.extract::<(i32, String)>(py)) {
                    Ok((code, message)) => status(code, message),
                    Err(e) => Status::internal(format!("search failed: {e}")),
                }
            })),
        }
    }

    fn info(&self, data: &[u8]) -> Result<Bytes, Status> {
        #[derive(Clone, PartialEq, prost::Message)]
        struct InfoRequest {}
        match <InfoRequest as prost::Message>::decode(data) {
            Ok(_) => Ok(self.serving().info.clone()),
            Err(_) => Err(Status::invalid_argument(format!(
                "request: {} bytes that are not a valid rest.retriever.v1.InfoRequest message; was the client generated from another .proto?",
                data.len()
            ))),
        }
    }
}

fn internal(e: PyErr) -> Status {
    Status::internal(format!("request check failed: {e}"))
}

struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

// ---------------------------------------------------------------------------------------------
// The hand-written service (what tonic's code generator would write, over raw bytes).

#[derive(Clone)]
struct RetrieverService {
    shared: Arc<Shared>,
}

impl tonic::server::NamedService for RetrieverService {
    const NAME: &'static str = SERVICE;
}

struct Unary {
    shared: Arc<Shared>,
    method: &'static str,
}

impl tonic::server::UnaryService<Bytes> for Unary {
    type Response = Bytes;
    type Future = BoxFuture<tonic::Response<Bytes>, Status>;
    fn call(&mut self, request: tonic::Request<Bytes>) -> Self::Future {
        let shared = self.shared.clone();
        let method = self.method;
        Box::pin(async move {
            shared.authorized(request.metadata().as_ref())?;
            let deadline = deadline_of(request.metadata().as_ref());
            let data = request.into_inner();
            let answer = if method == "Info" { shared.info(&data) } else { shared.answer(method, &data, deadline, None) };
            answer.map(tonic::Response::new)
        })
    }
}

struct Stream {
    shared: Arc<Shared>,
}

/// A stream's answers: one per request, in order, each made when the call's response body asks
/// for the next one (so the next request is read only once this one's answer is taken, and no
/// task or channel stands between the two). The stream's searches share one engine search
/// session. Dropped (the session with it) when the call ends, the client's going away included.
struct Answers {
    shared: Arc<Shared>,
    requests: tonic::Streaming<Bytes>,
    deadline: Option<Instant>,
    session: (Option<Arc<rest_retriever::Datastore>>, SearchSession),
    done: bool,
}

impl tonic::codegen::tokio_stream::Stream for Answers {
    type Item = Result<Bytes, Status>;

    fn poll_next(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        match std::pin::Pin::new(&mut this.requests).poll_next(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                this.done = true; // the client closed its side
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(status))) => {
                this.done = true;
                Poll::Ready(Some(Err(status)))
            }
            Poll::Ready(Some(Ok(data))) => {
                let answer = this.shared.answer("SearchStream", &data, this.deadline, Some(&mut this.session));
                this.done = answer.is_err(); // a refusal ends the stream, as on the Python port
                Poll::Ready(Some(answer))
            }
        }
    }
}

impl tonic::server::StreamingService<Bytes> for Stream {
    type Response = Bytes;
    type ResponseStream = Answers;
    type Future = BoxFuture<tonic::Response<Answers>, Status>;
    fn call(&mut self, request: tonic::Request<tonic::Streaming<Bytes>>) -> Self::Future {
        let shared = self.shared.clone();
        Box::pin(async move {
            shared.authorized(request.metadata().as_ref())?;
            let deadline = deadline_of(request.metadata().as_ref());
            let requests = request.into_inner();
            let session = (None, SearchSession::new());
            Ok(tonic::Response::new(Answers { shared, requests, deadline, session, done: false }))
        })
    }
}

impl<B> Service<http::Request<B>> for RetrieverService
where
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let shared = self.shared.clone();
        let codec = RawCodec { max_message_bytes: shared.max_message_bytes, side: "SERVER: " };
        // The limit is the codec's (RESOURCE_EXHAUSTED, as grpc core); tonic's own stays out of it.
        let grpc = || tonic::server::Grpc::new(codec.clone()).apply_max_message_size_config(Some(usize::MAX), Some(usize::MAX));
        match request.uri().path() {
            "/rest.retriever.v1.Retriever/Search" => {
                let mut grpc = grpc();
                Box::pin(async move { Ok(grpc.unary(Unary { shared, method: "Search" }, request).await) })
            }
            "/rest.retriever.v1.Retriever/Info" => {
                let mut grpc = grpc();
                Box::pin(async move { Ok(grpc.unary(Unary { shared, method: "Info" }, request).await) })
            }
            "/rest.retriever.v1.Retriever/SearchStream" => {
                let mut grpc = grpc();
                Box::pin(async move { Ok(grpc.streaming(Stream { shared }, request).await) })
            }
            _ => Box::pin(async move { Ok(Status::unimplemented("").into_http()) }),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The Python handle.

/// The native search port of a retrieval server, running on its own threads until `stop`.
#[pyclass(frozen, module = "rest._engine")]
pub struct NativeSearchServer {
    shared: Arc<Shared>,
    port: u16,
    runtime: Mutex<Option<tokio::runtime::Runtime>>,
    shutdown: Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
    served: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

#[pymethods]
impl NativeSearchServer {
    /// Binds `host:port` (0: a free port) and serves `datastore` with `limits` on `workers`
    /// threads. `fallback`: the Python servicer (`native_parse`, `native_engine_error`); `info`:
    /// the serialized `InfoResponse`; `token`: require `authorization: Bearer <token>`; `tls`:
    /// `(certificate PEM, key PEM, client CA PEM or None)`, TLS as on the main port.
    #[new]
    #[pyo3(signature = (host, port, datastore, limits, info, fallback, *, workers, max_concurrent_searches,
                        max_message_bytes, keepalive_time_s, keepalive_timeout_s, inline_search_s, token=None,
                        tls=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        host: String,
        port: u16,
        datastore: &Datastore,
        limits: &RequestLimits,
        info: Vec<u8>,
        fallback: Py<PyAny>,
        workers: usize,
        max_concurrent_searches: usize,
        max_message_bytes: usize,
        keepalive_time_s: f64,
        keepalive_timeout_s: f64,
        inline_search_s: f64,
        token: Option<String>,
        tls: Option<TlsFiles>,
    ) -> PyResult<Self> {
        let shared = Arc::new(Shared {
            serving: RwLock::new(Arc::new(Serving {
                store: datastore.shared(),
                limits: Arc::new(limits.clone()),
                info: Bytes::from(info),
            })),
            fallback,
            expected_auth: token.map(|t| format!("Bearer {t}").into_bytes()),
            max_in_flight: max_concurrent_searches,
            in_flight: AtomicUsize::new(0),
            max_message_bytes,
            inline_slice: Duration::try_from_secs_f64(inline_search_s.max(0.0)).unwrap_or(Duration::from_secs(1)),
            stats: Mutex::new(Stats::default()),
        });
        let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
        let address: SocketAddr = (host.as_str(), port)
            .to_socket_addrs()
            .map_err(|e| PyOSError::new_err(format!("--host {host}: {e}")))?
            .next()
            .ok_or_else(|| PyOSError::new_err(format!("--host {host} does not resolve")))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers.max(1))
            .thread_name("search-port")
            .enable_all()
            .build()
            .map_err(|e| PyRuntimeError::new_err(format!("search port runtime: {e}")))?;
        let listener = py.detach(|| runtime.block_on(tokio::net::TcpListener::bind(address)));
        let listener = listener.map_err(|e| PyOSError::new_err(format!("could not listen on {address}: {e}")))?;
        let port = listener.local_addr().map_err(|e| PyOSError::new_err(e.to_string()))?.port();
        let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let service = RetrieverService { shared: shared.clone() };
        let mut builder = tonic::transport::Server::builder();
        if let Some((cert, key, client_ca)) = tls {
            // The main port's credentials: its certificate and key, and with a client CA,
            // client certificates required (grpc's require_client_auth).
            use tonic::transport::{Certificate, Identity, ServerTlsConfig};
            let mut config = ServerTlsConfig::new().identity(Identity::from_pem(cert, key));
            if let Some(ca) = client_ca {
                config = config.client_ca_root(Certificate::from_pem(ca)).client_auth_optional(false);
            }
            builder = builder
                .tls_config(config)
                .map_err(|e| PyValueError::new_err(format!("--search-port: TLS files not usable: {e}")))?;
        }
        let server = builder
            .http2_keepalive_interval(Some(Duration::from_secs_f64(keepalive_time_s)))
            .http2_keepalive_timeout(Some(Duration::from_secs_f64(keepalive_timeout_s)))
            .add_service(service);
        let served = runtime.spawn(async move {
            let _ = server
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stopped.await;
                })
                .await;
        });
        Ok(NativeSearchServer {
            shared,
            port,
            runtime: Mutex::new(Some(runtime)),
            shutdown: Mutex::new(Some(stop)),
            served: Mutex::new(Some(served)),
        })
    }

    /// The bound port.
    #[getter]
    fn port(&self) -> u16 {
        self.port
    }

    /// Serves `datastore` with `limits` and `info` from now on (a reload); searches already
    /// running finish on the previous one.
    fn use_datastore(&self, datastore: &Datastore, limits: &RequestLimits, info: Vec<u8>) {
        let serving = Arc::new(Serving { store: datastore.shared(), limits: Arc::new(limits.clone()), info: Bytes::from(info) });
        *self.shared.serving.write().unwrap_or_else(|e| e.into_inner()) = serving;
    }

    /// Searches admitted and not answered yet.
    #[getter]
    fn in_flight(&self) -> usize {
        self.shared.in_flight.load(Ordering::Acquire)
    }

    /// Stops accepting calls, lets the calls in flight finish for up to `grace_s` seconds, then
    /// ends the rest and the threads. Idempotent.
    fn stop(&self, py: Python<'_>, grace_s: f64) {
        let runtime = self.runtime.lock().unwrap_or_else(|e| e.into_inner()).take();
        let Some(runtime) = runtime else { return };
        if let Some(stop) = self.shutdown.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = stop.send(());
        }
        let served = self.served.lock().unwrap_or_else(|e| e.into_inner()).take();
        py.detach(move || {
            if let Some(served) = served {
                let grace = Duration::try_from_secs_f64(grace_s.max(0.0)).unwrap_or(Duration::from_secs(86_400));
                let _ = runtime.block_on(async { tokio::time::timeout(grace, served).await });
            }
            runtime.shutdown_timeout(Duration::from_millis(100));
        });
    }

    /// The counters: `{"requests": {method: n}, "errors": {(method, code): n},
    /// "rejections": {reason: n}, "latency": {(method, outcome): (bucket counts, sum, count)},
    /// "buckets": the bucket bounds}`; bucket counts are per bucket (not cumulative), the last
    /// one above the highest bound.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let stats = self.shared.stats.lock().unwrap_or_else(|e| e.into_inner());
        let out = PyDict::new(py);
        out.set_item("requests", stats.requests.clone())?;
        out.set_item("errors", stats.errors.clone())?;
        out.set_item("rejections", stats.rejections.clone())?;
        let latency = PyDict::new(py);
        for (key, h) in &stats.latency {
            latency.set_item(*key, (PyList::new(py, h.buckets)?, h.sum, h.count))?;
        }
        out.set_item("latency", latency)?;
        out.set_item("buckets", LATENCY_BUCKETS_S.to_vec())?;
        Ok(out)
    }
}

impl Drop for NativeSearchServer {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.get_mut().unwrap_or_else(|e| e.into_inner()).take() {
            runtime.shutdown_background();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A bare echo on the same stack (tonic, the raw codec, the same runtime settings), for
// bench/service_latency.py: the floor of a native gRPC service, as its grpc.aio echo is
// Python's.

#[derive(Clone)]
struct EchoService;

impl tonic::server::NamedService for EchoService {
    const NAME: &'static str = "bench.Echo";
}

struct EchoUnary;

impl tonic::server::UnaryService<Bytes> for EchoUnary {
    type Response = Bytes;
    type Future = BoxFuture<tonic::Response<Bytes>, Status>;
    fn call(&mut self, request: tonic::Request<Bytes>) -> Self::Future {
        Box::pin(async move { Ok(tonic::Response::new(request.into_inner())) })
    }
}

struct EchoStream;

impl tonic::server::StreamingService<Bytes> for EchoStream {
    type Response = Bytes;
    type ResponseStream = tonic::Streaming<Bytes>;
    type Future = BoxFuture<tonic::Response<tonic::Streaming<Bytes>>, Status>;
    fn call(&mut self, request: tonic::Request<tonic::Streaming<Bytes>>) -> Self::Future {
        Box::pin(async move { Ok(tonic::Response::new(request.into_inner())) })
    }
}

impl<B> Service<http::Request<B>> for EchoService
where
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let mut grpc = tonic::server::Grpc::new(RawCodec { max_message_bytes: usize::MAX, side: "" });
        match request.uri().path() {
            "/bench.Echo/Unary" => Box::pin(async move { Ok(grpc.unary(EchoUnary, request).await) }),
            "/bench.Echo/Stream" => Box::pin(async move { Ok(grpc.streaming(EchoStream, request).await) }),
            _ => Box::pin(async move { Ok(Status::unimplemented("").into_http()) }),
        }
    }
}

/// `bench.Echo/Unary` and `/Stream` (bytes in, the same bytes out) on `127.0.0.1:port`, served
/// by tonic on `workers` threads until the process exits: bench/service_latency.py's native echo.
#[pyclass(frozen, module = "rest._engine")]
pub struct NativeEchoServer {
    port: u16,
    _runtime: tokio::runtime::Runtime,
}

#[pymethods]
impl NativeEchoServer {
    #[new]
    fn new(py: Python<'_>, port: u16, workers: usize) -> PyResult<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers.max(1))
            .enable_all()
            .build()
            .map_err(|e| PyRuntimeError::new_err(format!("echo runtime: {e}")))?;
        let listener = py
            .detach(|| runtime.block_on(tokio::net::TcpListener::bind(("127.0.0.1", port))))
            .map_err(|e| PyOSError::new_err(format!("could not listen on 127.0.0.1:{port}: {e}")))?;
        let port = listener.local_addr().map_err(|e| PyOSError::new_err(e.to_string()))?.port();
        let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        let server = tonic::transport::Server::builder().add_service(EchoService);
        runtime.spawn(async move {
            let _ = server.serve_with_incoming(incoming).await;
        });
        Ok(NativeEchoServer { port, _runtime: runtime })
    }

    #[getter]
    fn port(&self) -> u16 {
        self.port
    }
}
