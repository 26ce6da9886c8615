"""Every check a search request goes through before it reaches the engine, and the status codes.

The one place that decides what is a bad request and which gRPC status it gets: the servicer calls
``SearchRequestParser.parse`` and turns a ``RequestError`` into the status, and the engine's own
exceptions (should a request slip past these checks) are mapped by ``engine_error`` in the same
terms. Messages start with the proto field they are about (``context``, ``params.budget``,
``shard``) so a client author can tell what to fix, and stay short: a value from the request is
echoed only in part (``echo``), so that a refusal never grows with the request (a status message
travels in the call's trailers, whose size is limited: a long one turns the status into
RESOURCE_EXHAUSTED).

Requests arrive as bytes and are decoded here (``decode``): gRPC's own deserializer would turn a
malformed message into UNKNOWN, where a bad request is INVALID_ARGUMENT.

The engine has a copy of these checks for the server's inline searches
(``check_search_request`` in retriever_rs/python/src/wire.rs): it only ever accepts what
``SearchRequestParser`` accepts and leaves everything else to it, so a change to a check here
needs the same change there (tests/retriever_service/test_native_wire.py compares the two).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import grpc
from google.protobuf.message import DecodeError

from rest.datastore import MAX_LEVELS
from rest.datastore import RequestLimits as EngineLimits
from rest.types import SearchParams
from retriever_service.v1 import retriever_pb2 as pb
from retriever_service.wire import PARAM_FIELDS, POLICY_FROM_WIRE


@dataclass(frozen=True)
class PolicyCaps:
    """The largest ``budget`` and ``max_depth`` a server accepts for one policy: the work and
    memory of a search grow with both (for the REST policy, with up to 5,000 occurrences times
    ``max_depth`` counted prefixes), so a server bounds them below the protocol's own ranges."""

    max_budget: int
    max_depth: int


# The protocol's own ranges (budget 0..4096, max_depth 1..256): no cap below them.
PROTOCOL_CAPS = PolicyCaps(4096, 256)
# Per policy.
DEFAULT_POLICY_CAPS = (("exact", PROTOCOL_CAPS), ("rest", PolicyCaps(1024, 64)))


@dataclass(frozen=True)
class RequestLimits:
    """What this server accepts: its vocabulary, its context limit, the shards it serves and
    the caps on search parameters per policy."""

    vocab_size: int
    max_context_tokens: int
    shards: tuple[str, ...]
    policy_caps: tuple[tuple[str, PolicyCaps], ...] = DEFAULT_POLICY_CAPS

    def for_engine(self) -> EngineLimits:
        """The same limits in the engine's form, for ``Datastore.try_search_request`` (whose
        copy of these checks accepts only what ``SearchRequestParser`` accepts)."""
        caps = dict(self.policy_caps)

        def caps_of(policy: str) -> tuple[int, int]:
            c = caps.get(policy, PROTOCOL_CAPS)  # no caps of its own: the protocol's ranges
            return c.max_budget, c.max_depth

        return EngineLimits(self.vocab_size, self.max_context_tokens, self.shards,
                            caps_of("exact"), caps_of("rest"))


# The longest status message sent back; anything longer is cut. gRPC's default limit on a
# call's metadata is 8 KiB, and the message shares it with the other trailers.
MAX_MESSAGE_CHARS = 1024
ECHO_CHARS = 64  # the most characters of a client's value that a message repeats
LISTED_SHARDS = 8  # the most served shard names that a NOT_FOUND message lists


class RequestError(Exception):
    """A request the server refuses, with the status code the client gets (the message is cut
    to ``MAX_MESSAGE_CHARS``)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[: MAX_MESSAGE_CHARS - 3] + "..."
        super().__init__(message)
        self.code = code
        self.message = message


class ParsedSearch(NamedTuple):  # a tuple: built once per request, cheaper than a dataclass
    context: list[int]
    params: SearchParams
    shards: list[str] | None  # None: every served shard
    levels: int = 1  # back-off levels to answer (SearchRequest.levels)


class SearchRequestParser:
    """Turns a ``SearchRequest`` into the engine's arguments, or raises ``RequestError``."""

    # A session sends the same parameters with every request: remembering the valid ones by their
    # wire bytes saves building and re-validating a SearchParams per request.
    _PARAMS_CACHE_SIZE = 1024

    def __init__(self, limits: RequestLimits) -> None:
        self.limits = limits
        self._params: dict[bytes, SearchParams] = {b"": SearchParams()}

    def parse(self, request: pb.SearchRequest) -> ParsedSearch:
        params = self.params(request.params)  # an unset message serializes to b"": defaults
        context = parse_context(request.context, self.limits)
        shards = parse_shard(request.shard, self.limits) if request.HasField("shard") else None
        levels = parse_levels(request.levels) if request.HasField("levels") else 1
        # The engine only looks at the last max_span tokens; slicing here saves copying the rest.
        return ParsedSearch(context[-params.max_span :], params, shards, levels)

    def params(self, wire: pb.SearchParams) -> SearchParams:
        key = wire.SerializeToString(deterministic=True)
        params = self._params.get(key)
        if params is None:
            params = parse_params(wire)
            check_caps(params, self.limits)
            if len(self._params) >= self._PARAMS_CACHE_SIZE:
                self._params = {b"": SearchParams()}
            self._params[key] = params
        return params


def echo(value: str) -> str:
    """``value`` quoted for a message, cut to ``ECHO_CHARS`` characters with its length said."""
    if len(value) <= ECHO_CHARS:
        return repr(value)
    return f"{value[:ECHO_CHARS]!r}... ({len(value)} characters)"


def decode(message_type, data: bytes):
    """``message_type`` parsed from the request's bytes; a malformed one is INVALID_ARGUMENT."""
    try:
        return message_type.FromString(data)
    except DecodeError:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"request: {len(data)} bytes that are not a valid {message_type.DESCRIPTOR.full_name}"
            " message; was the client generated from another .proto?",
        ) from None


def parse_context(context, limits: RequestLimits) -> list[int]:
    n = len(context)
    if n == 0:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "context: must not be empty")
    if n > limits.max_context_tokens:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"context: {n} tokens is more than this server's limit of {limits.max_context_tokens};"
            " send only the last max_span tokens",
        )
    tokens = context[:]  # a list, made in C (several times faster than list(context))
    if max(tokens) >= limits.vocab_size:  # uint32 on the wire: no negative ids to check
        position, token = next((i, t) for i, t in enumerate(tokens) if t >= limits.vocab_size)
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"context: token id {token} at position {position} is outside the datastore's"
            f" vocabulary (size {limits.vocab_size}); was it built with another tokenizer?",
        )
    return tokens


def parse_params(wire: pb.SearchParams) -> SearchParams:
    # SearchParams validates its own ranges; reusing it keeps one definition of "in range".
    policy = POLICY_FROM_WIRE.get(wire.policy)
    if policy is None:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT, f"params.policy: unknown value {wire.policy}"
        )
    given = {name: getattr(wire, name) for name in PARAM_FIELDS if wire.HasField(name)}
    try:
        return SearchParams(**given, policy=policy)
    except ValueError as exc:  # messages start with the field name: "budget must be in 0..4096"
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"params.{exc}") from None


def check_caps(params: SearchParams, limits: RequestLimits) -> None:
    """Refuses parameters above this server's caps for their policy (``PolicyCaps``)."""
    caps = dict(limits.policy_caps).get(params.policy)
    if caps is None:
        return
    for name, value, cap in (("budget", params.budget, caps.max_budget),
                             ("max_depth", params.max_depth, caps.max_depth)):
        if value > cap:
            option = f"--{params.policy}-max-{name.removeprefix('max_')}"
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"params.{name}: {value} is more than this server's limit of {cap} for the"
                f" {params.policy} policy ({option}); ask for at most {cap}",
            )
def parse_levels(levels: int) -> int:
    """``SearchRequest.levels``: 1 to ``MAX_LEVELS`` (each level is a whole search)."""
    if not 1 <= levels <= MAX_LEVELS:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"levels: must be in 1..{MAX_LEVELS} (each back-off level is a whole search), got {levels}",
        )
    return levels


def parse_shard(shard: str, limits: RequestLimits) -> list[str]:
    if shard not in limits.shards:
        served = ", ".join(limits.shards[:LISTED_SHARDS])
        if len(limits.shards) > LISTED_SHARDS:
            served += f" and {len(limits.shards) - LISTED_SHARDS} more (see Info)"
        raise RequestError(
            grpc.StatusCode.NOT_FOUND,
            f"shard: {echo(shard)} is not served here; this server serves {served}",
        )
    return [shard]


def engine_error(exc: Exception) -> RequestError:
    """The status for an exception the engine raised on a request that passed the checks above."""
    from rest.datastore import ShardUnavailableError

    if isinstance(exc, ShardUnavailableError):  # its file changed or failed a check: try a replica
        return RequestError(grpc.StatusCode.UNAVAILABLE, str(exc))
    if isinstance(exc, KeyError):
        return RequestError(grpc.StatusCode.NOT_FOUND, f"shard: {exc}")
    if isinstance(exc, ValueError):
        return RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    return RequestError(grpc.StatusCode.INTERNAL, f"search failed: {type(exc).__name__}: {exc}")
