"""API keys: who may call the gateway's client-facing APIs.

Keys come from ``api_keys`` (``PDSERVE_API_KEYS``, comma-separated) and ``api_keys_file`` (one per
line). With any key configured, the HTTP API wants ``Authorization: Bearer KEY`` and the gRPC API the
same value in ``authorization`` metadata. Every configured key is compared in constant time (no early
exit on the first match or the first differing byte), and no key is ever logged.
"""

from __future__ import annotations

import hmac

import grpc

AUTH_METADATA = "authorization"


class ApiKeys:
    def __init__(self, keys: tuple[str, ...] = (), keys_file: str = "") -> None:
        found = [k.strip() for k in keys if k.strip()]
        if keys_file:
            with open(keys_file) as f:
                found += [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
        self._keys = [k.encode() for k in dict.fromkeys(found)]

    @property
    def required(self) -> bool:
        return bool(self._keys)

    @property
    def count(self) -> int:
        return len(self._keys)

    def allows(self, authorization: str | None) -> bool:
        """Whether ``authorization`` (the header's value) is ``Bearer <a configured key>``; always True
        when no key is configured."""
        if not self._keys:
            return True
        scheme, _, token = (authorization or "").partition(" ")
        given = token.strip().encode()
        ok = False
        for key in self._keys:
            ok |= hmac.compare_digest(given, key)
        return ok and scheme.lower() == "bearer"


def bearer(api_key: str) -> tuple[tuple[str, str], ...]:
    """The gRPC call metadata that carries ``api_key`` (empty: none)."""
    return ((AUTH_METADATA, f"Bearer {api_key}"),) if api_key else ()


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls to ``methods`` (full names, e.g. ``/pdserve.v1.Gateway/Generate``) that lack a valid
    key with ``UNAUTHENTICATED``; other methods (health checks) pass."""

    def __init__(self, keys: ApiKeys, methods: frozenset[str]) -> None:
        self._keys = keys
        self._methods = methods

        async def refuse(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "missing or invalid API key (send 'authorization: Bearer KEY' metadata)")

        self._refusal = {
            "unary": grpc.unary_unary_rpc_method_handler(refuse),
            "stream": grpc.unary_stream_rpc_method_handler(refuse),
        }

    async def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method not in self._methods or not self._keys.required:
            return await continuation(handler_call_details)
        value = dict(handler_call_details.invocation_metadata or ()).get(AUTH_METADATA)
        if self._keys.allows(value):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        return self._refusal["stream" if handler.response_streaming else "unary"]
