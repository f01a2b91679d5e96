"""A real OTLP/HTTP trace receiver: services export to it as they would to Jaeger or Phoenix.

It accepts ``POST /v1/traces`` (protobuf, optionally gzip) and keeps every span
as a plain dict: ids in hex, the parent's id, name, the resource's service
name, attributes and events. Tests read them; the tracing benchmark runs it as
its own process (``python -m bench.otlp_sink PORT``: parses and counts, keeps
nothing) so that the traced services pay their full export cost while no
heavyweight backend competes for the cores.
"""

from __future__ import annotations

import gzip
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (ExportTraceServiceRequest,
                                                                       ExportTraceServiceResponse)


def _value(v):
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


def _attrs(kvs) -> dict:
    return {kv.key: _value(kv.value) for kv in kvs}


class OtlpSink:
    def __init__(self, port: int = 0, keep: bool = True) -> None:
        self.keep = keep
        self.received = 0
        self.spans: list[dict] = []
        self._lock = threading.Lock()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                sink._add(ExportTraceServiceRequest.FromString(body))
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def _add(self, request: ExportTraceServiceRequest) -> None:
        if not self.keep:
            with self._lock:
                self.received += sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
            return
        found = []
        for rs in request.resource_spans:
            service = _attrs(rs.resource.attributes).get("service.name", "")
            for ss in rs.scope_spans:
                for s in ss.spans:
                    found.append({
                        "trace_id": s.trace_id.hex(), "span_id": s.span_id.hex(),
                        "parent_id": s.parent_span_id.hex(), "name": s.name, "service": service,
                        "attributes": _attrs(s.attributes),
                        "events": [{"name": e.name, "attributes": _attrs(e.attributes)} for e in s.events],
                        "start_ns": s.start_time_unix_nano, "end_ns": s.end_time_unix_nano,
                    })
        with self._lock:
            self.spans.extend(found)
            self.received += len(found)

    def trace(self, trace_id: str) -> list[dict]:
        with self._lock:
            return [s for s in self.spans if s["trace_id"] == trace_id]

    def wait_for(self, trace_id: str, predicate, timeout_s: float = 20.0) -> list[dict]:
        """The trace's spans once ``predicate(spans)`` holds; raises with what arrived if it never does."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            spans = self.trace(trace_id)
            if predicate(spans):
                return spans
            time.sleep(0.1)
        raise AssertionError(f"trace {trace_id} incomplete after {timeout_s} s: "
                             f"{sorted((s['service'], s['name']) for s in self.trace(trace_id))}")

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class ReceiverProcess:
    """``with ReceiverProcess() as receiver:`` an OtlpSink in its own process that counts spans and keeps
    none; ``receiver.env`` makes a service export every span to it (sampling ratio 1.0); after the block,
    ``receiver.report`` says how many arrived."""

    def __enter__(self) -> "ReceiverProcess":
        self._process = subprocess.Popen([sys.executable, "-m", "bench.otlp_sink"], stdout=subprocess.PIPE,
                                         text=True)
        self.env = {"OTEL_EXPORTER_OTLP_ENDPOINT": self._process.stdout.readline().strip(),
                    "OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "1.0"}
        self.report = ""
        return self

    def __exit__(self, *exc) -> None:
        self._process.terminate()
        self.report = self._process.communicate(timeout=10)[0].strip()


if __name__ == "__main__":
    import signal

    stop = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop)  # before the server thread starts: it inherits the mask
    sink = OtlpSink(int(sys.argv[1]) if len(sys.argv) > 1 else 0, keep=False)
    print(sink.endpoint, flush=True)
    signal.sigwait(stop)
    print(f"spans received: {sink.received}", flush=True)
