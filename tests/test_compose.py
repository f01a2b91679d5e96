"""The docker-compose cluster, for real: build the images, ``docker compose up`` until healthy, serve requests
from the host, read their traces back from Phoenix, scale decode to two and ``docker kill`` the one serving a
stream mid-generation, then tear it all down.

Needs a Docker engine with the compose v2 plugin (``scripts/docker-setup.sh`` installs and starts them as
root). Without one the tests skip, except under ``CI=true``, where they fail. On machines without a
registry, ``docker/prepare.sh`` makes the base image (debootstrap) and readies the build context.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from pdserve_cli.cluster import free_port
from pdserve.sdk import Client
from services.gateway.text import encode_chat
from tests.cluster import reference_greedy

pytestmark = [pytest.mark.slow, pytest.mark.compose]

ROOT = Path(__file__).resolve().parent.parent
PROJECT = "pdserve-test"
QUESTION = "Why is the sky blue?"
SCREENSHOT = ROOT / "docs" / "trace-view.png"


def docker_ready() -> str:
    """Why the compose tests cannot run here ("" when they can)."""
    if not shutil.which("docker"):
        return "no docker CLI"
    for cmd in (["docker", "info"], ["docker", "compose", "version"]):
        if subprocess.run(cmd, capture_output=True).returncode != 0:
            return f"`{' '.join(cmd)}` fails (run scripts/docker-setup.sh as root)"
    return ""


def log(message: str) -> None:
    print(f"[compose] {message}", file=sys.stderr, flush=True)


class Compose:
    def __init__(self) -> None:
        self.port, self.metrics_port, self.phoenix_port = free_port(), free_port(), free_port()
        self.http_port = free_port()
        self.env = {**os.environ, "PDSERVE_BASE_IMAGE": os.environ.get("PDSERVE_BASE_IMAGE", "pdserve-base:bookworm"),
                    "PDSERVE_THREADS": "1", "PDSERVE_KV_BUDGET": "256MiB", "PDSERVE_PORT": str(self.port),
                    "PDSERVE_METRICS_PORT": str(self.metrics_port), "PDSERVE_PHOENIX_PORT": str(self.phoenix_port),
                    "PDSERVE_HTTP_PORT": str(self.http_port)}

    @property
    def gateway(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def phoenix(self) -> str:
        return f"http://127.0.0.1:{self.phoenix_port}"

    def run(self, *args: str, timeout: float = 900, check: bool = True, quiet: bool = False) -> str:
        cmd = ["docker", "compose", "-p", PROJECT, *args]
        started = time.monotonic()
        done = subprocess.run(cmd, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout)
        if not quiet:
            log(f"{' '.join(args)}: exit {done.returncode} in {time.monotonic() - started:.0f} s")
        if check and done.returncode != 0:
            logs = subprocess.run(["docker", "compose", "-p", PROJECT, "logs", "--tail", "40"], cwd=ROOT,
                                  env=self.env, capture_output=True, text=True).stdout
            raise AssertionError(f"docker compose {' '.join(args)} failed ({done.returncode}):\n"
                                 f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}\n--- logs ---\n{logs[-8000:]}")
        return done.stdout

    def decode_containers(self) -> list[str]:
        return self.run("ps", "-q", "decode", quiet=True).split()

    def gateway_metric(self, sample: str) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as reply:
            for line in reply.read().decode().splitlines():
                if line.startswith(sample + " "):
                    return float(line.split()[-1])
        return 0.0


def require_docker(stage: str) -> None:
    """Skips where Docker cannot run, but fails under CI=true, which runs every stage."""
    why = docker_ready()
    if why:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI runs the {stage} tests, but {why}")
        pytest.skip(why)


@pytest.fixture(scope="module")
def compose():
    require_docker("compose")
    c = Compose()
    log("docker/prepare.sh (base image, CA certificates, torch wheel)")
    subprocess.run(["bash", "docker/prepare.sh"], cwd=ROOT, env=c.env, check=True, timeout=900)
    c.run("down", "-v", "--remove-orphans", "-t", "5", quiet=True)
    try:
        log("building the images (first time: several minutes)")
        c.run("build")
        log("up: provisioning the model into its volume, starting phoenix, prefill, decode, gateway")
        c.run("up", "-d", "--wait", "--wait-timeout", "900")
        yield c
    finally:
        c.run("down", "-v", "--remove-orphans", "-t", "5", check=False)


def phoenix_spans(c: Compose, trace_id: str | None = None) -> list[dict]:
    spans, cursor = [], None
    while True:
        url = f"{c.phoenix}/v1/projects/default/spans?limit=1000" + (f"&cursor={cursor}" if cursor else "")
        with urllib.request.urlopen(url, timeout=10) as reply:
            page = json.load(reply)
        spans += page["data"]
        cursor = page.get("next_cursor")
        if not cursor:
            break
    return [s for s in spans if trace_id is None or s["context"]["trace_id"] == trace_id]


def wait_for_spans(c: Compose, predicate, trace_id: str | None = None, timeout_s: float = 30) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while True:
        spans = phoenix_spans(c, trace_id)
        if predicate(spans):
            return spans
        if time.monotonic() > deadline:
            raise AssertionError(f"Phoenix never held the spans expected: {sorted(s['name'] for s in spans)[:60]}")
        time.sleep(0.5)


def expected_tokens(smol, max_tokens: int, ignore_eos: bool = False) -> list[int]:
    prompt = encode_chat(smol.info.tokenizer, [{"role": "user", "content": QUESTION}])
    return reference_greedy(smol, prompt, max_tokens, ignore_eos=ignore_eos)


def test_compose_serves_and_phoenix_holds_one_trace_across_the_services(compose, smol, tmp_path):
    c = compose
    otel = {"OTEL_EXPORTER_OTLP_ENDPOINT": c.phoenix, "OTEL_BSP_SCHEDULE_DELAY": "100"}
    done = subprocess.run([sys.executable, "-m", "pdserve_cli", "generate", "--address", c.gateway, "--chat", QUESTION,
                           "--max-tokens", "24", "--temperature", "0", "--json"],
                          env={**os.environ, **otel}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert result["token_ids"] == expected_tokens(smol, 24)
    log(f"answer: {result['text']!r}")

    needed = {"pdserve generate", "pdserve.request", "pdserve.schedule", "prefill.forward", "kv.transfer",
              "/pdserve.v1.Decode/PushKV", "decode.admission", "decode.lifetime"}
    spans = wait_for_spans(c, lambda spans: needed <= {s["name"] for s in spans}, result["trace_id"])
    services = {s["attributes"]["service.name"] for s in spans}
    assert services == {"pdserve-client", "pdserve-gateway", "pdserve-prefill", "pdserve-decode"}
    by_id = {s["context"]["span_id"]: s for s in spans}

    def only(name: str) -> dict:
        found = [s for s in spans if s["name"] == name]
        assert len(found) == 1, (name, len(found))
        return found[0]

    def parent(span: dict) -> str:
        return by_id[span["parent_id"]]["name"]

    assert only("pdserve generate")["parent_id"] is None
    assert parent(only("/pdserve.v1.Gateway/Generate")) == "pdserve.client.generate"
    assert parent(only("pdserve.request")) == "/pdserve.v1.Gateway/Generate"
    attempt = only("pdserve.attempt")
    assert parent(attempt) == "pdserve.request"
    assert parent(only("/pdserve.v1.Prefill/Prefill")) == "pdserve.attempt"
    assert parent(only("/pdserve.v1.Decode/Generate")) == "pdserve.attempt"
    assert parent(only("kv.transfer")) == "/pdserve.v1.Prefill/Prefill"
    assert all(parent(s) == "/pdserve.v1.Prefill/Prefill" for s in spans if s["name"] == "/pdserve.v1.Decode/PushKV")
    assert parent(only("decode.lifetime")) == "/pdserve.v1.Decode/Generate"
    transfer = only("kv.transfer")["attributes"]
    assert transfer["pdserve.kv.transport"] == "grpc"  # separate containers: no shared /dev/shm
    assert transfer["pdserve.kv.layers"] == 30 and transfer["pdserve.kv.bytes"] > 0
    assert only("decode.lifetime")["attributes"]["pdserve.tokens"] == 23

    # The trace view, as a user opens it: the span tree with the KV transfer selected.
    from playwright.sync_api import sync_playwright

    project = json.load(urllib.request.urlopen(f"{c.phoenix}/v1/projects", timeout=10))["data"][0]["id"]
    out = SCREENSHOT if os.environ.get("PDSERVE_UPDATE_DOCS") == "1" else tmp_path / "trace-view.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium") or "/usr/bin/chromium", args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.goto(f"{c.phoenix}/projects/{project}/traces/{result['trace_id']}", wait_until="networkidle",
                      timeout=60_000)
            page.get_by_text("kv.transfer", exact=True).first.click()
            page.get_by_text("pdserve.kv.gb_per_s").first.wait_for(timeout=20_000)
            for name in ("pdserve.request", "/pdserve.v1.Decode/Generate", "prefill.forward", "decode.lifetime"):
                assert page.get_by_text(name, exact=True).count() >= 1, name
            page.screenshot(path=str(out))
        finally:
            browser.close()
    assert out.stat().st_size > 20_000
    log(f"trace view screenshot: {out}")


def test_compose_members_talk_mutual_tls_and_publish_only_the_client_apis(compose, smol):
    c = compose
    # The OpenAI-compatible API, from the host, as curl would call it: the gRPC path's tokens.
    body = json.dumps({"model": "default", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 12,
                       "temperature": 0}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{c.http_port}/v1/chat/completions", data=body,
                                     headers={"content-type": "application/json"})
    reply = json.loads(urllib.request.urlopen(request, timeout=300).read())
    tok = smol.info.tokenizer
    assert reply["choices"][0]["message"]["content"] == tok.decode(expected_tokens(smol, 12), skip_special_tokens=True)

    def health(*args: str) -> tuple[int, str]:
        done = subprocess.run(["docker", "compose", "-p", PROJECT, "exec", "-T", "gateway", "pdserve", "health", *args],
                              cwd=ROOT, env=c.env, capture_output=True, text=True, timeout=60)
        return done.returncode, done.stdout.strip()

    for address in ("prefill:50061", "decode:50071"):
        assert health("--address", address)[0] == 0  # a member's certificate (the gateway's)
        for stranger in (["--plaintext"], ["--tls-cert", "", "--tls-key", ""]):  # no certificate
            code, said = health("--address", address, *stranger)
            assert code == 1 and said.endswith("no answer"), (address, stranger, said)
    published = {}
    for line in c.run("ps", "--format", "json", quiet=True).splitlines():
        entry = json.loads(line)
        published[entry["Service"]] = {(p.get("URL"), p["TargetPort"]) for p in entry.get("Publishers") or ()
                                       if p.get("PublishedPort")}
    assert {s for s, ports in published.items() if ports} == {"gateway", "phoenix"}
    assert {port for url, port in published["gateway"] if url not in ("127.0.0.1",)} == {50051, 8000}
    assert {url for url, _ in published["phoenix"]} == {"127.0.0.1"}
    uid = c.run("exec", "-T", "decode", "id", "-u", quiet=True).strip()
    assert uid == "10001"


def test_scaled_decode_killed_mid_stream_the_request_finishes(compose, smol):
    c = compose
    c.run("up", "-d", "--scale", "decode=2", "--wait", "--wait-timeout", "600")
    deadline = time.monotonic() + 60
    while c.gateway_metric('pdserve_instances{role="decode",state="up"}') < 2:
        assert time.monotonic() < deadline, "the gateway never saw the second decode replica"
        time.sleep(0.5)
    decodes = c.decode_containers()
    assert len(decodes) == 2

    max_tokens = 120
    chunks, errors = [], []

    def stream() -> None:
        try:
            with Client(c.gateway, timeout=300) as client:
                for chunk in client.stream(messages=[{"role": "user", "content": QUESTION}], max_tokens=max_tokens,
                                           temperature=0.0, ignore_eos=True):
                    chunks.append(chunk)
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    reader = threading.Thread(target=stream)
    reader.start()
    deadline = time.monotonic() + 120
    while len(chunks) < 10:
        assert time.monotonic() < deadline and not errors, f"no stream: {errors}"
        time.sleep(0.05)

    def batch_size(container: str) -> float:
        out = subprocess.run(["docker", "exec", container, "python", "-c",
                              "import urllib.request;print(urllib.request.urlopen('http://127.0.0.1:9100/metrics')"
                              ".read().decode())"], capture_output=True, text=True, timeout=30).stdout
        return next(float(line.split()[-1]) for line in out.splitlines() if line.startswith("pdserve_decode_batch_size "))

    serving = [d for d in decodes if batch_size(d) >= 1]
    assert len(serving) == 1, "exactly one decode replica should hold the stream"
    at = len(chunks)
    subprocess.run(["docker", "kill", serving[0]], check=True, capture_output=True, timeout=30)
    log(f"killed decode container {serving[0][:12]} after {at} chunks")
    reader.join(timeout=300)
    assert not errors, errors
    tokens = [t for ch in chunks for t in ch.token_ids]
    assert [ch.index for ch in chunks if ch.token_ids] == list(range(len(tokens)))
    assert tokens == expected_tokens(smol, max_tokens, ignore_eos=True)
    assert c.gateway_metric("pdserve_migrations_total") >= 1

    request_id = chunks[0].request_id
    spans = wait_for_spans(c, lambda spans: any(
        s["name"] == "pdserve.request" and s["attributes"].get("pdserve.request_id") == request_id for s in spans))
    request = next(s for s in spans if s["name"] == "pdserve.request"
                   and s["attributes"].get("pdserve.request_id") == request_id)
    events = [e["name"] for e in request["events"]]
    assert "retry" in events and "migration" in events, events
    attempts = [s for s in phoenix_spans(c, request["context"]["trace_id"]) if s["name"] == "pdserve.attempt"]
    assert len(attempts) >= 2
