"""Bearer-token authentication for the server: ``authorization: Bearer <token>`` metadata.

The token is checked in an interceptor so that no handler has to remember to. Health checks are
exempt: load balancers and orchestrators probe them without credentials, and they reveal nothing
about the datastore. The token travels in clear text unless the server uses TLS.
"""

from __future__ import annotations

import hmac

import grpc

EXEMPT_PREFIX = "/grpc.health.v1.Health/"


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("the bearer token must not be empty")
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(EXEMPT_PREFIX):
            return handler
        if self._authorized(handler_call_details.invocation_metadata or ()):
            return handler
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
