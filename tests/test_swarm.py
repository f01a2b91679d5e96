"""The Docker Swarm stack, for real, on a single-node swarm: deploy ``deploy/swarm/stack.yml`` (members over
mutual TLS with certificates and API keys as swarm secrets), serve requests from the host, scale decode to
two and ``docker kill`` the replica holding a stream (the stream finishes exact; the swarm starts a
replacement that rejoins and gets work), roll prefill over under load (nothing lost), and ``docker stack
rm`` leaves nothing behind. Needs what the compose tests need (they build the image it deploys); ports
are published in host mode (this VM has no IPVS for the routing mesh)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from pdserve.rpc import check_health
from pdserve.sdk import Client
from pdserve.tls import make_certificates
from pdserve_cli.cluster import free_port
from tests.test_compose import QUESTION, ROOT, Compose, expected_tokens, log, require_docker

pytestmark = [pytest.mark.slow, pytest.mark.compose]

STACK = "pdserve-swarm-test"
KEY = "swarm-test-key"


def docker(*args: str, check: bool = True, timeout: float = 300, **kw) -> str:
    done = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, **kw)
    if check and done.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed ({done.returncode}): {done.stderr[-3000:]}")
    return done.stdout


def containers(service: str) -> list[str]:
    """The running containers of a stack service."""
    return docker("ps", "-q", "--filter", f"label=com.docker.swarm.service.name={STACK}_{service}").split()


def metrics(container: str) -> dict[str, float]:
    out = docker("exec", container, "python", "-c", "import urllib.request; print(urllib.request.urlopen("
                 "'http://127.0.0.1:9100/metrics').read().decode())", check=False, timeout=30)
    samples = {}
    for line in out.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def gateway_metric(sample: str) -> float:
    found = containers("gateway")
    return metrics(found[0]).get(sample, 0.0) if found else 0.0


def wait_for(what: str, predicate, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(1)


class Stack:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port, self.http_port = free_port(), free_port()
        self.env = {**os.environ, "PDSERVE_PORT": str(self.port), "PDSERVE_HTTP_PORT": str(self.http_port),
                    "PDSERVE_PUBLISH_MODE": "host", "PDSERVE_THREADS": "1", "PDSERVE_KV_BUDGET": "256MiB"}

    @property
    def gateway(self) -> str:
        return f"127.0.0.1:{self.port}"

    def deploy(self) -> None:
        docker("stack", "deploy", "-c", "stack.yml", STACK, cwd=self.folder, env=self.env)

    def ready(self) -> bool:
        import asyncio

        return asyncio.run(check_health(self.gateway, timeout=2.0))


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    require_docker("swarm")
    compose = Compose()
    subprocess.run(["bash", "docker/prepare.sh"], cwd=ROOT, env=compose.env, check=True, timeout=900)
    log("building the images (cached after the compose tests)")
    compose.run("build", "gateway", "phoenix")
    joined = docker("info", "--format", "{{.Swarm.LocalNodeState}}").strip() == "active"
    if not joined:
        docker("swarm", "init", "--advertise-addr", "127.0.0.1")
    folder = tmp_path_factory.mktemp("swarm")
    shutil.copy(ROOT / "deploy" / "swarm" / "stack.yml", folder / "stack.yml")
    make_certificates(folder / "certs", hosts=("gateway", "prefill", "decode"))
    (folder / "api-keys").write_text(KEY + "\n")
    s = Stack(folder)
    try:
        docker("volume", "create", f"{STACK}_models")
        log("provisioning the model into the stack's volume")
        docker("run", "--rm", "-v", f"{STACK}_models:/models", "pdserve:local", "model", "fetch", timeout=900)
        log("docker stack deploy")
        s.deploy()
        wait_for("the gateway to be ready", s.ready, 600)
        yield s
    finally:
        docker("stack", "rm", STACK, check=False)
        deadline = time.monotonic() + 120
        while docker("ps", "-aq", "--filter", f"label=com.docker.stack.namespace={STACK}", check=False).split():
            if time.monotonic() > deadline:
                break
            time.sleep(1)
        for volume in ("models", "traces"):
            docker("volume", "rm", f"{STACK}_{volume}", check=False)
        if not joined:
            docker("swarm", "leave", "--force", check=False)


def test_the_stack_serves_with_keys_over_both_apis(stack, smol):
    with Client(stack.gateway, api_key=KEY, timeout=300) as client:
        result = client.generate(messages=[{"role": "user", "content": QUESTION}], max_tokens=16, temperature=0)
    assert result.token_ids == expected_tokens(smol, 16)
    body = json.dumps({"model": "default", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 16,
                       "temperature": 0}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{stack.http_port}/v1/chat/completions", data=body,
                                     headers={"content-type": "application/json", "authorization": f"Bearer {KEY}"})
    reply = json.loads(urllib.request.urlopen(request, timeout=300).read())
    assert reply["choices"][0]["message"]["content"] == result.text
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(urllib.request.Request(request.full_url, data=body,
                                                      headers={"content-type": "application/json"}), timeout=60)
    assert refused.value.code == 401


def stream_in_background(stack: Stack, max_tokens: int, chunks: list, errors: list) -> threading.Thread:
    def stream() -> None:
        try:
            with Client(stack.gateway, api_key=KEY, timeout=600) as client:
                for chunk in client.stream(messages=[{"role": "user", "content": QUESTION}], max_tokens=max_tokens,
                                           temperature=0.0, ignore_eos=True):
                    chunks.append(chunk)
        except Exception as exc:  # noqa: BLE001 - reported by the caller's assertions
            errors.append(exc)

    thread = threading.Thread(target=stream)
    thread.start()
    return thread


def test_a_killed_decode_replica_loses_nothing_and_its_replacement_rejoins(stack, smol):
    docker("service", "scale", f"{STACK}_decode=2")
    wait_for("two decode replicas up at the gateway",
             lambda: gateway_metric('pdserve_instances{role="decode",state="up"}') >= 2, 600)
    max_tokens = 120
    chunks, errors = [], []
    reader = stream_in_background(stack, max_tokens, chunks, errors)
    wait_for("the stream to start", lambda: len(chunks) >= 10 or errors, 120)
    assert not errors, errors
    before_kill = containers("decode")
    serving = [c for c in before_kill if metrics(c).get("pdserve_decode_batch_size", 0) >= 1]
    assert len(serving) == 1, "exactly one decode replica should hold the stream"
    docker("kill", serving[0])
    log(f"killed decode container {serving[0][:12]} after {len(chunks)} chunks")
    reader.join(timeout=600)
    assert not errors, errors
    tokens = [t for ch in chunks for t in ch.token_ids]
    assert [ch.index for ch in chunks if ch.token_ids] == list(range(len(tokens)))
    assert tokens == expected_tokens(smol, max_tokens, ignore_eos=True)
    assert gateway_metric("pdserve_migrations_total") >= 1
    # The swarm replaces the killed task; the gateway finds it (DNS) and sends it work again.
    wait_for("the replacement decode replica up at the gateway",
             lambda: len(containers("decode")) == 2
             and gateway_metric('pdserve_instances{role="decode",state="up"}') >= 2, 600)
    replacement = [c for c in containers("decode") if c not in before_kill]
    assert len(replacement) == 1
    before = {c: metrics(c).get("pdserve_kv_received_bytes_total", 0.0) for c in replacement}
    with Client(stack.gateway, api_key=KEY, timeout=300) as client:
        for i in range(8):
            client.generate(token_ids=[10 + i, 11, 12, 13], max_tokens=4, temperature=0)
    after = {c: metrics(c).get("pdserve_kv_received_bytes_total", 0.0) for c in replacement}
    assert all(after[c] > before[c] for c in replacement), "a decode replica got no new work"


def test_a_rolling_update_of_prefill_under_load_loses_nothing(stack, smol):
    results, errors = [], []

    def load() -> None:
        try:
            with Client(stack.gateway, api_key=KEY, timeout=600) as client:
                for i in range(24):
                    prompt = [20 + i, 21, 22, 23, 24, 25]
                    results.append((prompt, client.generate(token_ids=prompt, max_tokens=8, temperature=0)))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    worker = threading.Thread(target=load)
    worker.start()
    wait_for("the load to start", lambda: results or errors, 120)
    old = containers("prefill")
    log("docker service update --force prefill (start-first)")
    docker("service", "update", "--force", "--detach=false", f"{STACK}_prefill", timeout=900)
    worker.join(timeout=900)
    assert not errors, errors
    assert len(results) == 24
    from tests.cluster import reference_greedy

    for prompt, result in results:
        assert result.token_ids == reference_greedy(smol, prompt, 8)
    # The update converges once the new task runs (start-first); the old one then drains (up to its stop
    # grace period) before its container goes: "still listed" right after the update is not "not replaced".
    wait_for("the old prefill container to go", lambda: not set(old) & set(containers("prefill")), 120)
    with Client(stack.gateway, api_key=KEY, timeout=300) as client:  # the new task serves
        assert client.generate(token_ids=[5, 6, 7], max_tokens=4, temperature=0).completion_tokens == 4


def test_stack_rm_leaves_nothing_behind(stack):
    docker("stack", "rm", STACK)
    deadline = time.monotonic() + 120
    while True:
        left = {
            "containers": docker("ps", "-aq", "--filter", f"label=com.docker.stack.namespace={STACK}").split(),
            "services": docker("service", "ls", "-q", "--filter", f"label=com.docker.stack.namespace={STACK}").split(),
            "networks": docker("network", "ls", "-q", "--filter", f"label=com.docker.stack.namespace={STACK}").split(),
            "secrets": docker("secret", "ls", "-q", "--filter", f"label=com.docker.stack.namespace={STACK}").split(),
        }
        if not any(left.values()):
            break
        assert time.monotonic() < deadline, f"left behind: {left}"
        time.sleep(1)
