"""Bearer-token authentication for the server: ``authorization: Bearer <token>`` metadata.

The token is checked in an interceptor so that no handler has to remember to. Health checks are
exempt: load balancers and orchestrators probe them without credentials, and they reveal nothing
about the datastore. The token travels in clear text unless the server uses TLS.

No authentication is the absence of a token, never an empty one: an empty ``--token`` or
``REST_RETRIEVER_TOKEN`` (a Kubernetes secret with an empty value, say) is an error on the server
and on the clients alike (``check_token``), so that a missing secret cannot open a server.
"""

from __future__ import annotations

import hmac
import os

import click
import grpc

EXEMPT_PREFIX = "/grpc.health.v1.Health/"
TOKEN_ENV = "REST_RETRIEVER_TOKEN"


def check_token(token: str | None, source: str = "token") -> str | None:
    """``token`` if it can be sent as ``authorization: Bearer <token>``; ``None`` stays ``None``
    (no authentication). Raises ``ValueError`` naming ``source`` (an option or a variable)."""
    if token is None:
        return None
    if not token.strip():
        raise ValueError(
            f"{source} is empty: an empty token would turn authentication off; set the token, or"
            " leave the option (and the variable) out for a server without authentication"
        )
    if token != token.strip():
        raise ValueError(
            f"{source} starts or ends with whitespace (a secret written with a trailing newline?);"
            " remove it"
        )
    if not (token.isascii() and token.isprintable()) or " " in token:
        raise ValueError(
            f"{source} holds characters a gRPC header cannot carry; use printable ASCII without"
            " spaces (for example a base64 or hex string)"
        )
    return token


def bearer_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """The call metadata that carries ``token`` (none for ``None``); an invalid token raises."""
    token = check_token(token)
    return () if token is None else (("authorization", f"Bearer {token}"),)


def token_option(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Click callback for a ``--token`` option whose default is ``REST_RETRIEVER_TOKEN``:
    ``click.option("--token", callback=token_option, help=...)``, without ``envvar``.

    The callback reads the variable itself: click treats an empty variable as unset, where an
    empty secret must be an error rather than a server (or a client) without authentication."""
    try:
        return resolve_token(value, f"--{param.name.replace('_', '-')}")
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from None


def resolve_token(value: str | None, option: str = "--token") -> str | None:
    """The token of a ``--token`` option given ``value`` (``None``: not given), else of
    ``REST_RETRIEVER_TOKEN`` even when empty (an empty secret is an error, not "no token"),
    checked by ``check_token``; a ``ValueError`` names the option or the variable."""
    source = option
    if value is None and os.environ.get(TOKEN_ENV) is not None:
        value, source = os.environ[TOKEN_ENV], TOKEN_ENV
    return check_token(value, source)


# The variable the callback reads, for whoever lists what a command reads from the environment
# (click's own ``envvar`` cannot be used: it treats an empty variable as unset).
token_option.envvar = TOKEN_ENV


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Lets through calls with the token (and health checks); ``on_reject`` is called for each
    call refused (the server counts them)."""

    def __init__(self, token: str, on_reject=None) -> None:
        if check_token(token) is None:
            raise ValueError("BearerTokenInterceptor needs a token")
        self._expected = f"Bearer {token}".encode()
        self._on_reject = on_reject

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(EXEMPT_PREFIX):
            return handler
        if self._authorized(handler_call_details.invocation_metadata or ()):
            return handler
        if self._on_reject is not None:
            self._on_reject("unauthenticated")
        return _rejecting(handler)

    def _authorized(self, metadata) -> bool:
        for key, value in metadata:
            if key == "authorization":
                given = value.encode() if isinstance(value, str) else value
                # compare_digest: the time taken does not tell how much of the token was right.
                return hmac.compare_digest(given, self._expected)
        return False


async def _reject(request_or_iterator, context) -> None:
    await context.abort(
        grpc.StatusCode.UNAUTHENTICATED,
        "missing or wrong bearer token: send metadata 'authorization: Bearer <token>'",
    )


def _rejecting(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that fails with UNAUTHENTICATED."""
    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    make = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(
        _reject,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
