//! The retrieval server's native search endpoint: `rest.retriever.v1.Retriever/Search` and
//! `/SearchStream` served by tonic on threads of its own, in the server's process.
//!
//! Why: in the Python `grpc.aio` server a search message costs about what a bare echo costs plus
//! the search run cold on the event loop, which slows gRPC's own path around it
//! (docs/BENCHMARKS.md, "What the server does per message that the echo does not"). Here an
//! accepted request is decoded and checked (`wire::check_search_request`), searched and encoded
//! without Python and without the GIL.
//!
//! One way to answer: anything this path does not accept itself (a request the engine's checks
//! leave to the Python parser, one with a trace context, a search the engine fails) is handed,
//! with the GIL, to the Python servicer's `answer_blocking`, which answers or refuses it exactly
//! as the main port does. What stays in Python: Info, health, reflection, reloads (the server
//! calls `use_datastore`), tracing, TLS (the server refuses a search port with TLS).

use crate::datastore::Datastore;
use crate::wire::{check_search_request, encode_search_response, RequestLimits};
use bytes::{Buf, BufMut, Bytes};
use futures_util::stream::{self, BoxStream, StreamExt};
use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use rest_retriever::Cancel;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::server::{Grpc, NamedService, StreamingService, UnaryService};
use tonic::{Code, Request, Response, Status, Streaming};

const SERVICE: &str = "rest.retriever.v1.Retriever";
/// The methods served here, as counted in `counts`, and their paths.
const METHODS: [&str; 2] = ["Search", "SearchStream"];
const PATHS: [&str; 2] = ["/rest.retriever.v1.Retriever/Search", "/rest.retriever.v1.Retriever/SearchStream"];
/// gRPC's status codes run from 0 (OK) to 16 (UNAUTHENTICATED).
const CODES: usize = 17;
const UNAUTHENTICATED: &str = "missing or wrong bearer token: send metadata 'authorization: Bearer <token>'";
const DEADLINE: &str = "deadline passed before the search started; not searched";

/// Messages as their bytes: requests are decoded by `check_search_request` (or the Python
/// parser), responses are encoded by the engine.
#[derive(Default, Clone, Copy)]
struct BytesCodec;

impl Codec for BytesCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = BytesCodec;
    type Decoder = BytesCodec;
    fn encoder(&mut self) -> Self::Encoder {
        *self
    }
    fn decoder(&mut self) -> Self::Decoder {
        *self
    }
}

impl Encoder for BytesCodec {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for BytesCodec {
    type Item = Bytes;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// What the endpoint serves; replaced whole by `use_datastore` (a reload).
struct Serving {
    datastore: Arc<rest_retriever::Datastore>,
    limits: RequestLimits,
    /// `RetrieverServicer.answer_blocking`: `(request bytes, remaining seconds or None)` ->
    /// the response's bytes, or `(status code, message)`.
    python: Py<PyAny>,
}

struct Shared {
    serving: RwLock<Arc<Serving>>,
    /// `b"Bearer <token>"`, when the server has a token.
    expected_authorization: Option<Vec<u8>>,
    max_in_flight: usize,
    in_flight: AtomicUsize,
    max_message_bytes: usize,
    /// Calls answered, by method and status code.
    counts: [[AtomicU64; CODES]; METHODS.len()],
}

/// Decrements the in-flight count when the search is over, however it ends.
struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Shared {
    fn serving(&self) -> Arc<Serving> {
        self.serving.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn count(&self, method: usize, code: Code) {
        self.counts[method][(code as usize).min(CODES - 1)].fetch_add(1, Ordering::Relaxed);
    }

    fn authorized(&self, headers: &http::HeaderMap) -> bool {
        let Some(expected) = &self.expected_authorization else { return true };
        let Some(given) = headers.get("authorization") else { return false };
        constant_time_eq(given.as_bytes(), expected)
    }

    /// The answer to one request: the serialized `SearchResponse`, or the status that ends the
    /// call. `session`: the stream's search session.
    fn answer(&self, data: &[u8], deadline: Option<Instant>, session: Option<&mut rest_retriever::SearchSession>) -> Result<Bytes, Status> {
        let serving = self.serving();
        let Some(checked) = check_search_request(data, &serving.limits) else {
            return ask_python(&serving, data, deadline);
        };
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Err(Status::deadline_exceeded(DEADLINE));
        }
        let before = self.in_flight.fetch_add(1, Ordering::Relaxed);
        let _in_flight = InFlight(&self.in_flight);
        if before >= self.max_in_flight {
            return Err(Status::resource_exhausted(format!(
                "server busy: {before} searches in flight (limit {}); retry later or on another replica",
                self.max_in_flight
            )));
        }
        let only = checked.shards.as_deref();
        let cancel = Cancel::at(deadline);
        let store = &serving.datastore;
        let found = match session {
            Some(s) => s.search_levels_cancellable(store, &checked.context, &checked.query, checked.levels, only, &cancel),
            None => store.search_levels_cancellable(&checked.context, &checked.query, checked.levels, only, &cancel),
        };
        match found {
            Ok(Some(found)) => {
                let label = only.map(|s| s.join(",")).unwrap_or_default();
                let searched = store.shard_names_of(&found.searched);
                Ok(Bytes::from(encode_search_response(found.trees, label, searched)))
            }
            Ok(None) => Err(Status::deadline_exceeded("deadline passed during the search; not answered")),
            // A shard out of service, say: the Python path gives the engine error's status and
            // message, as on the main port.
            Err(_) => ask_python(&serving, data, deadline),
        }
    }
}

/// `data` answered by the Python servicer, with the GIL.
fn ask_python(serving: &Serving, data: &[u8], deadline: Option<Instant>) -> Result<Bytes, Status> {
    let remaining = deadline.map(|d| d.saturating_duration_since(Instant::now()).as_secs_f64());
    Python::attach(|py| {
        let answer = serving.python.call1(py, (PyBytes::new(py, data), remaining))?;
        let answer = answer.bind(py);
        if let Ok(bytes) = answer.cast::<PyBytes>() {
            return Ok(Ok(Bytes::copy_from_slice(bytes.as_bytes())));
        }
        let (code, message): (i32, String) = answer.extract()?;
        Ok(Err(Status::new(Code::from(code), message)))
    })
    .unwrap_or_else(|err: PyErr| Err(Status::internal(format!("search failed: {err}"))))
}

/// Equal bytes, in a time that does not depend on where they differ (as `hmac.compare_digest`).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The call's deadline from its `grpc-timeout` header (gRPC over HTTP/2: at most 8 digits and a
/// unit, H M S m u n); `None` without one. A malformed header counts as none, as gRPC's own
/// servers treat it.
fn deadline_of(headers: &http::HeaderMap, now: Instant) -> Option<Instant> {
    let value = headers.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    let timeout = match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    };
    now.checked_add(timeout)
}

#[derive(Clone)]
struct RetrieverService(Arc<Shared>);

impl NamedService for RetrieverService {
    const NAME: &'static str = SERVICE;
}

struct SearchMethod(Arc<Shared>, Option<Instant>);

impl UnaryService<Bytes> for SearchMethod {
    type Response = Bytes;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Bytes>, Status>> + Send>>;
    fn call(&mut self, request: Request<Bytes>) -> Self::Future {
        let (shared, deadline) = (self.0.clone(), self.1);
        Box::pin(async move {
            let answer = shared.answer(request.get_ref(), deadline, None);
            shared.count(0, answer.as_ref().map_or_else(|s| s.code(), |_| Code::Ok));
            answer.map(Response::new)
        })
    }
}

struct SearchStreamMethod(Arc<Shared>, Option<Instant>);

impl StreamingService<Bytes> for SearchStreamMethod {
    type Response = Bytes;
    type ResponseStream = BoxStream<'static, Result<Bytes, Status>>;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Self::ResponseStream>, Status>> + Send>>;
    fn call(&mut self, request: Request<Streaming<Bytes>>) -> Self::Future {
        let (shared, deadline) = (self.0.clone(), self.1);
        Box::pin(async move {
            // One response per request, in order; an error ends the stream with its status. A
            // stream is one decoding session: its searches share an engine search session.
            let start = (request.into_inner(), rest_retriever::SearchSession::new());
            let responses = stream::unfold(Some(start), move |state| {
                let shared = shared.clone();
                async move {
                    let (mut requests, mut session) = state?;
                    let (answer, next) = match requests.message().await {
                        Ok(Some(data)) => match shared.answer(&data, deadline, Some(&mut session)) {
                            Ok(bytes) => (Ok(bytes), Some((requests, session))),
                            Err(status) => (Err(status), None),
                        },
                        Ok(None) => {
                            shared.count(1, Code::Ok);
                            return None;
                        }
                        Err(status) => (Err(status), None),
                    };
                    if let Err(status) = &answer {
                        shared.count(1, status.code());
                    }
                    Some((answer, next))
                }
            });
            Ok(Response::new(responses.boxed()))
        })
    }
}

impl<B> tower_service::Service<http::Request<B>> for RetrieverService
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let shared = self.0.clone();
        Box::pin(async move {
            let path = request.uri().path();
            let Some(method) = PATHS.iter().position(|p| *p == path) else {
                return Ok(Status::unimplemented(format!("{path} is not served on the search port; use the main port")).into_http());
            };
            if !shared.authorized(request.headers()) {
                shared.count(method, Code::Unauthenticated);
                return Ok(Status::unauthenticated(UNAUTHENTICATED).into_http());
            }
            let deadline = deadline_of(request.headers(), Instant::now());
            let limit = shared.max_message_bytes;
            let mut grpc = Grpc::new(BytesCodec).max_decoding_message_size(limit).max_encoding_message_size(limit);
            Ok(if method == 0 {
                grpc.unary(SearchMethod(shared, deadline), request).await
            } else {
                grpc.streaming(SearchStreamMethod(shared, deadline), request).await
            })
        })
    }
}

/// The native search endpoint of a retrieval server (see the module's documentation).
#[pyclass(frozen, module = "rest._engine")]
pub struct SearchServer {
    shared: Arc<Shared>,
    port: u16,
    runtime: Mutex<Option<tokio::runtime::Runtime>>,
    stop: Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
    done: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

#[pymethods]
impl SearchServer {
    /// Listens on `host:port` (0: a free port) at once and serves from `threads` threads.
    /// `answer_blocking`: see `Serving::python`; `token`: the bearer token calls must carry.
    #[new]
    #[pyo3(signature = (datastore, limits, answer_blocking, host, port, threads, max_in_flight, max_message_bytes, keepalive_time_s, token=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        datastore: &Datastore,
        limits: &RequestLimits,
        answer_blocking: Py<PyAny>,
        host: &str,
        port: u16,
        threads: usize,
        max_in_flight: usize,
        max_message_bytes: usize,
        keepalive_time_s: f64,
        token: Option<String>,
    ) -> PyResult<Self> {
        let address: SocketAddr = format!("{}:{port}", bracketed(host))
            .parse()
            .or_else(|_| std::net::ToSocketAddrs::to_socket_addrs(&(host, port)).map_err(|e| e.to_string()).and_then(|mut a| a.next().ok_or_else(|| "no address".into())))
            .map_err(|e| PyValueError::new_err(format!("search port: {host} is not an address of this machine ({e})")))?;
        let listener = std::net::TcpListener::bind(address)
            .map_err(|e| PyOSError::new_err(format!("could not listen on {address} (--search-port): {e}")))?;
        listener.set_nonblocking(true).map_err(|e| PyOSError::new_err(e.to_string()))?;
        let port = listener.local_addr().map_err(|e| PyOSError::new_err(e.to_string()))?.port();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads.max(1))
            .thread_name("rest-search-port")
            .enable_all()
            .build()
            .map_err(|e| PyOSError::new_err(format!("could not start the search port's threads: {e}")))?;
        let shared = Arc::new(Shared {
            serving: RwLock::new(Arc::new(Serving { datastore: datastore.shared(), limits: limits.clone(), python: answer_blocking })),
            expected_authorization: token.map(|t| format!("Bearer {t}").into_bytes()),
            max_in_flight,
            in_flight: AtomicUsize::new(0),
            max_message_bytes,
            counts: Default::default(),
        });
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let service = RetrieverService(shared.clone());
        let keepalive = (keepalive_time_s > 0.0).then(|| Duration::from_secs_f64(keepalive_time_s));
        let done = {
            let _entered = runtime.enter();
            let listener = tokio::net::TcpListener::from_std(listener).map_err(|e| PyOSError::new_err(e.to_string()))?;
            let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
            runtime.spawn(async move {
                let served = tonic::transport::Server::builder()
                    .http2_keepalive_interval(keepalive)
                    .add_service(service)
                    .serve_with_incoming_shutdown(incoming, async {
                        let _ = stop_rx.await;
                    })
                    .await;
                if let Err(err) = served {
                    eprintln!("retriever-server: the search port stopped: {err}");
                }
            })
        };
        Ok(SearchServer {
            shared,
            port,
            runtime: Mutex::new(Some(runtime)),
            stop: Mutex::new(Some(stop_tx)),
            done: Mutex::new(Some(done)),
        })
    }

    /// The bound port.
    #[getter]
    fn port(&self) -> u16 {
        self.port
    }

    /// Serves `datastore` with `limits` from now on (a reload); calls already running finish
    /// on the previous one.
    fn use_datastore(&self, datastore: &Datastore, limits: &RequestLimits, answer_blocking: Py<PyAny>) {
        let serving = Arc::new(Serving { datastore: datastore.shared(), limits: limits.clone(), python: answer_blocking });
        *self.shared.serving.write().unwrap_or_else(|e| e.into_inner()) = serving;
    }

    /// Searches running now.
    #[getter]
    fn in_flight(&self) -> usize {
        self.shared.in_flight.load(Ordering::Relaxed)
    }

    /// Calls answered so far as `[(method, status code, count)]`, the counts that are not 0.
    fn counts(&self) -> Vec<(&'static str, i32, u64)> {
        let mut out = Vec::new();
        for (m, name) in METHODS.iter().enumerate() {
            for code in 0..CODES {
                let n = self.shared.counts[m][code].load(Ordering::Relaxed);
                if n > 0 {
                    out.push((*name, code as i32, n));
                }
            }
        }
        out
    }

    /// Stops accepting calls, lets those in flight finish for up to `grace_s` seconds, then
    /// ends the rest. Idempotent.
    fn shutdown(&self, py: Python<'_>, grace_s: f64) {
        if let Some(stop) = self.stop.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = stop.send(());
        }
        let runtime = self.runtime.lock().unwrap_or_else(|e| e.into_inner()).take();
        let done = self.done.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let (Some(runtime), Some(done)) = (runtime, done) {
            // Without the GIL: a call in flight may need it to finish (a refusal's message).
            py.detach(move || {
                let grace = Duration::from_secs_f64(grace_s.max(0.0));
                let _ = runtime.block_on(async { tokio::time::timeout(grace, done).await });
                runtime.shutdown_timeout(Duration::ZERO);
            });
        }
    }
}

/// `::1` -> `[::1]`, for `host:port`.
fn bracketed(host: &str) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_units() {
        let now = Instant::now();
        let with = |v: &str| {
            let mut h = http::HeaderMap::new();
            h.insert("grpc-timeout", v.parse().unwrap());
            deadline_of(&h, now).map(|d| d - now)
        };
        assert_eq!(with("100m"), Some(Duration::from_millis(100)));
        assert_eq!(with("2S"), Some(Duration::from_secs(2)));
        assert_eq!(with("5u"), Some(Duration::from_micros(5)));
        assert_eq!(with("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(with("123456789m"), None); // more than 8 digits
        assert_eq!(with("m"), None);
        assert_eq!(with("10x"), None);
        assert_eq!(deadline_of(&http::HeaderMap::new(), now), None);
    }

    #[test]
    fn paths_name_the_service_and_its_methods() {
        for (path, method) in PATHS.iter().zip(METHODS) {
            assert_eq!(*path, format!("/{SERVICE}/{method}"));
        }
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(constant_time_eq(b"Bearer abc", b"Bearer abc"));
        assert!(!constant_time_eq(b"Bearer abd", b"Bearer abc"));
        assert!(!constant_time_eq(b"Bearer ab", b"Bearer abc"));
    }
}
