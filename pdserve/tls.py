"""Who may talk to a cluster member: mutual TLS between the services, and a shared token without it.

``ClusterAuth`` is one member's identity and trust, from its ``tls_cert``/``tls_key``/``tls_ca`` files
and ``cluster_token``:

- with a CA, every server of the member (prefill, decode, the gateway's internal listener) requires a
  client certificate signed by it, and every channel the member opens to another presents its own
  certificate and accepts only a server certificate from that CA. Certificates name the cluster, not a
  host (``tls_server_name``, default ``pdserve.internal``): addresses come and go (scaled compose
  services, restarts on other hosts), membership is what is checked;
- with a token, every call between members carries it (``x-pdserve-cluster-token`` metadata) and the
  servers refuse calls without it (``UNAUTHENTICATED``): a join secret for deployments without TLS.
  Health checks are exempt (probes and container healthchecks need no secret).

``make_certificates`` writes a development CA and certificates (``pdserve certs``).
"""

from __future__ import annotations

import datetime
import hmac
import ipaddress
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import grpc

CLUSTER_NAME = "pdserve.internal"
TOKEN_METADATA = "x-pdserve-cluster-token"
_HEALTH = "/grpc.health.v1.Health/"


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"{what}: cannot read {path!r} ({exc.strerror})") from None


@dataclass(frozen=True)
class TlsFiles:
    """PEM bytes of a certificate, its key and the CA that signs peers (any may be absent)."""

    cert: bytes | None = None
    key: bytes | None = None
    ca: bytes | None = None

    @classmethod
    def load(cls, cert: str = "", key: str = "", ca: str = "") -> "TlsFiles":
        if bool(cert) != bool(key):
            raise ValueError("tls_cert and tls_key: give both or neither")
        return cls(_read(cert, "tls_cert") if cert else None, _read(key, "tls_key") if key else None,
                   _read(ca, "tls_ca") if ca else None)

    @property
    def enabled(self) -> bool:
        return self.ca is not None or self.cert is not None

    def server_credentials(self, require_client_certs: bool) -> grpc.ServerCredentials:
        if self.cert is None:
            raise ValueError("TLS on a server needs tls_cert and tls_key")
        return grpc.ssl_server_credentials([(self.key, self.cert)], root_certificates=self.ca,
                                           require_client_auth=require_client_certs and self.ca is not None)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self.ca, private_key=self.key,
                                            certificate_chain=self.cert)


class _AddToken:
    def __init__(self, token: str) -> None:
        self._pair = (TOKEN_METADATA, token)

    def _details(self, details):
        return details._replace(metadata=grpc.aio.Metadata(*(details.metadata or ()), self._pair))


# One class per call kind: grpc.aio files a channel's interceptor under the first kind it implements only.
class _TokenUnaryUnary(_AddToken, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(self._details(details), request)


class _TokenUnaryStream(_AddToken, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(self._details(details), request)


class _TokenStreamUnary(_AddToken, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, details, request_iterator):
        return await continuation(self._details(details), request_iterator)


class _TokenStreamStream(_AddToken, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, details, request_iterator):
        return await continuation(self._details(details), request_iterator)


class _SyncToken(_AddToken, grpc.StreamUnaryClientInterceptor, grpc.UnaryUnaryClientInterceptor):
    """The cluster token on a synchronous channel's calls (``ClusterAuth.sync_channel``: KV pushes)."""

    def _details(self, details):
        return details._replace(metadata=(*(details.metadata or ()), self._pair))

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)


def _token_interceptors(token: str) -> list:
    """Add the cluster token to every call of a channel."""
    return [kind(token) for kind in (_TokenUnaryUnary, _TokenUnaryStream, _TokenStreamUnary, _TokenStreamStream)]


class TokenGuard(grpc.aio.ServerInterceptor):
    """Refuses every call but health checks that lacks the cluster token (``UNAUTHENTICATED``)."""

    def __init__(self, token: str) -> None:
        self._token = token.encode()

        async def refuse(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "not a member of this cluster (no valid "
                                "cluster token)")

        self._unary = grpc.unary_unary_rpc_method_handler(refuse)
        self._stream = grpc.unary_stream_rpc_method_handler(refuse)
        self._client_stream = grpc.stream_unary_rpc_method_handler(refuse)
        self._both = grpc.stream_stream_rpc_method_handler(refuse)

    async def intercept_service(self, continuation, details):
        if details.method.startswith(_HEALTH):
            return await continuation(details)
        given = dict(details.invocation_metadata or ()).get(TOKEN_METADATA, "")
        if hmac.compare_digest(str(given).encode(), self._token):
            return await continuation(details)
        handler = await continuation(details)
        if handler is None:
            return None
        if handler.request_streaming:
            return self._both if handler.response_streaming else self._client_stream
        return self._stream if handler.response_streaming else self._unary


@dataclass(frozen=True)
class ClusterAuth:
    """One member's credentials towards the others (see the module's docstring). The default: none."""

    tls: TlsFiles = TlsFiles()
    token: str = ""
    server_name: str = CLUSTER_NAME

    @classmethod
    def from_config(cls, config) -> "ClusterAuth":
        """From a ``ServerConfig`` (or anything with ``tls_cert``, ``tls_key``, ``tls_ca``, ``tls_server_name``
        and ``cluster_token``)."""
        tls = TlsFiles.load(config.tls_cert, config.tls_key, config.tls_ca)
        if tls.ca is not None and tls.cert is None:
            raise ValueError("tls_ca: mutual TLS needs this member's own tls_cert and tls_key too")
        return cls(tls, config.cluster_token, config.tls_server_name or CLUSTER_NAME)

    @property
    def mutual_tls(self) -> bool:
        return self.tls.ca is not None

    @property
    def authenticated(self) -> bool:
        """Whether only members can call this member's servers."""
        return self.mutual_tls or bool(self.token)

    def channel(self, address: str, options: list | None = None) -> grpc.aio.Channel:
        options = list(options or ())
        interceptors = _token_interceptors(self.token) if self.token else None
        if not self.tls.enabled:
            return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)
        options.append(("grpc.ssl_target_name_override", self.server_name))
        return grpc.aio.secure_channel(address, self.tls.channel_credentials(), options=options,
                                       interceptors=interceptors)

    def sync_channel(self, address: str, options: list | None = None) -> grpc.Channel:
        """``channel``'s synchronous twin, for calls made from threads: a KV push's sends run there with the
        GIL released (grpc.aio writes on the event loop holding it)."""
        options = list(options or ())
        if not self.tls.enabled:
            channel = grpc.insecure_channel(address, options=options)
        else:
            options.append(("grpc.ssl_target_name_override", self.server_name))
            channel = grpc.secure_channel(address, self.tls.channel_credentials(), options=options)
        return grpc.intercept_channel(channel, _SyncToken(self.token)) if self.token else channel

    def server_credentials(self) -> grpc.ServerCredentials | None:
        return self.tls.server_credentials(require_client_certs=True) if self.tls.cert is not None else None

    def server_interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        return [TokenGuard(self.token)] if self.token else []


NO_AUTH = ClusterAuth()


# ---- development certificates ------------------------------------------------------------------------

ROLES = ("gateway", "prefill", "decode", "client")


def make_certificates(folder: str | os.PathLike, hosts: Iterable[str] = (), days: int = 365,
                      roles: Iterable[str] = ROLES) -> dict[str, Path]:
    """A development CA (``ca.pem``, ``ca-key.pem``) and, per role, ``ROLE.pem`` and ``ROLE-key.pem``
    signed by it, for both ends of a connection (server and client use). Every certificate names the
    cluster (``pdserve.internal``), localhost and its addresses, this host and ``hosts`` (compose service
    names, the gateway's public name). Keys are written 0600. Returns the paths by name."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)

    def pem_key(key) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    def write(name: str, data: bytes, private: bool = False) -> Path:
        path = folder / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return path

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pdserve development CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False),
                         critical=True)
          .sign(ca_key, hashes.SHA256()))
    paths = {"ca": write("ca.pem", ca.public_bytes(serialization.Encoding.PEM)),
             "ca-key": write("ca-key.pem", pem_key(ca_key), private=True)}
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys([CLUSTER_NAME, "localhost", socket.gethostname(), *hosts]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    names += [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.IPAddress(ipaddress.ip_address("::1"))]
    for role in roles:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"pdserve {role}")]))
                .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(start).not_valid_after(end)
                .add_extension(x509.SubjectAlternativeName(names), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .sign(ca_key, hashes.SHA256()))
        paths[role] = write(f"{role}.pem", cert.public_bytes(serialization.Encoding.PEM))
        paths[f"{role}-key"] = write(f"{role}-key.pem", pem_key(key), private=True)
    return paths
