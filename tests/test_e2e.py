"""End to end with real processes: `pdserve up`, the CLI, the SDKs, graceful shutdown."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from pdserve_cli.cluster import ClusterSpec, LocalCluster, free_port
from pdserve.sdk import AsyncClient, Client, Unavailable
from tests.cluster import reference_greedy

pytestmark = pytest.mark.slow

PDSERVE = [sys.executable, "-m", "pdserve_cli"]


class LineReader:
    """Collects a child's output lines on a thread so the test can wait for one."""

    def __init__(self, stream) -> None:
        self.lines: list[str] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream) -> None:
        for line in stream:
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines:
                    if m := re.search(pattern, line):
                        return m
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no line matching {pattern!r}; got:\n{''.join(self.lines[-30:])}")
                self._cond.wait(left)


def test_pdserve_up_demo_then_cli_and_sdk_then_ctrl_c(smol):
    up = subprocess.Popen([*PDSERVE, "up", "--demo", "--port", "0", "--http-port", str(free_port())], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    out, err = LineReader(up.stdout), LineReader(up.stderr)
    try:
        address = err.wait_for(r"serving on (127\.0\.0\.1:\d+);", timeout=240).group(1)
        # The demo answer streamed, with its timings.
        timing = err.wait_for(r"\[(\d+) tokens, finish=(\w+), TTFT (\d+) ms, TPOT ([\d.]+) ms\]", timeout=5)
        assert int(timing.group(1)) > 5
        out.wait_for(r"(?i)sky|blue", timeout=5)  # the answer, on stdout

        # `pdserve generate --json` prints one object with the documented fields.
        tok = smol.info.tokenizer
        cli = subprocess.run([*PDSERVE, "generate", "--address", address, "--json", "--max-tokens", "12",
                              "--temperature", "0", "The capital of Italy is"],
                             capture_output=True, text=True, timeout=120)
        assert cli.returncode == 0, cli.stderr
        result = json.loads(cli.stdout)
        assert set(result) >= {"text", "token_ids", "finish_reason", "ttft", "tpot"}
        expected = reference_greedy(smol, tok("The capital of Italy is")["input_ids"], 12)
        assert result["token_ids"] == expected
        assert result["text"] == tok.decode(expected, skip_special_tokens=True)
        assert result["ttft"] > 0 and result["tpot"] > 0

        # The blocking client, streamed and not.
        with Client(address) as client:
            chunks = list(client.stream("The capital of Italy is", max_tokens=12, temperature=0))
            assert [t for c in chunks for t in c.token_ids] == expected
            assert client.generate(token_ids=[1, 2, 3], max_tokens=0 + 3, temperature=0).completion_tokens == 3
            assert client.model_info().name == "SmolLM2-135M-Instruct"

        # The OpenAI-compatible API, as `curl` would call it (the command `pdserve up` prints).
        url = err.wait_for(r"OpenAI-compatible API on (http://[\d.:]+/v1)", timeout=5).group(1)
        body = json.dumps({"model": "default", "messages": [{"role": "user", "content": "Say hello."}],
                           "max_tokens": 8, "temperature": 0}).encode()
        request = urllib.request.Request(f"{url}/chat/completions", data=body,
                                         headers={"content-type": "application/json"})
        reply = json.loads(urllib.request.urlopen(request, timeout=120).read())
        assert reply["choices"][0]["message"]["content"] and reply["usage"]["completion_tokens"] == 8

        # Bad CLI input is reported, not a traceback.
        bad = subprocess.run([*PDSERVE, "generate", "--address", address, "--max-tokens", "0", "hi"],
                             capture_output=True, text=True, timeout=60)
        assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr and "sampling.max_tokens" in bad.stderr
    finally:
        up.send_signal(signal.SIGINT)
        code = up.wait(timeout=60)
    assert code == 0
    err.wait_for(r"\[up\] stopping the cluster", timeout=5)


async def test_graceful_shutdown_finishes_in_flight_requests():
    # The drain may take as long as it needs here: 1,500 tokens took over 10 s (the default grace) on a loaded
    # 2-core machine, and decode then cancelled the stream, as it should past its grace.
    cluster = LocalCluster(ClusterSpec(model="preset:tiny-llama", gateway_port=0, threads=1,
                                       extra_env={"PDSERVE_SHUTDOWN_GRACE_S": "120"}))
    try:
        await cluster.start()
        await cluster.wait_healthy(timeout_s=120)
        async with AsyncClient(cluster.gateway_address) as client:
            stream = client.stream(token_ids=[1, 2, 3], max_tokens=1500, temperature=0)
            chunks = [await anext(stream)]
            for member in reversed(cluster.members):  # what `pdserve up` does on Ctrl-C
                member.process.send_signal(signal.SIGTERM)
            chunks += [c async for c in stream]
            assert [c.index for c in chunks] == list(range(1500))
            assert chunks[-1].finish_reason == "length"
        codes = [m.process.wait(timeout=60) for m in cluster.members]
        assert codes == [0] * len(codes)
    finally:
        cluster.stop()


async def test_health_service_and_refusal_after_shutdown():
    cluster = LocalCluster(ClusterSpec(model="preset:tiny-llama", gateway_port=0, threads=1))
    try:
        await cluster.start()
        await cluster.wait_healthy(timeout_s=120)
        from pdserve.rpc import check_health, health_status
        from pdserve.tls import NO_AUTH

        for member in cluster.members:
            service = {"gateway": "pdserve.v1.Gateway", "prefill-0": "pdserve.v1.Prefill",
                       "decode-0": "pdserve.v1.Decode"}[member.name]
            # Members talk mutual TLS: the instances answer a member's certificate, not a stranger.
            auth = NO_AUTH if member.name == "gateway" else cluster.auth
            assert await check_health(member.address, service, auth=auth)
            if member.name != "gateway":
                assert await health_status(member.address, service) == "no answer"
        cluster.stop()
        async with AsyncClient(cluster.gateway_address, timeout=5) as client:
            with pytest.raises(Unavailable):
                await client.generate(token_ids=[1, 2], max_tokens=2)
    finally:
        cluster.stop()


@pytest.mark.parametrize("relays", [False, True])
async def test_ctrl_c_to_the_process_group_drains_in_flight_streams_and_leaves_nothing_behind(relays):
    """A terminal's Ctrl-C reaches `pdserve up` and every member at once (one process group), and then
    `pdserve up` stops them: in-flight streams still finish, every process exits, no KV segment is left.
    With ``relays`` the KV goes over gRPC through a KV sender and a KV receiver process, which are in the
    group too: they outlive the Ctrl-C until their instance stops them."""
    import os

    from pdserve.kv.shm import segment_names

    before = set(segment_names())
    env = {**os.environ, **({"PDSERVE_KV_TRANSPORT": "grpc", "PDSERVE_KV_SENDERS": "1", "PDSERVE_KV_RECEIVERS": "1"}
                            if relays else {})}
    up = subprocess.Popen([*PDSERVE, "up", "--port", "0", "--model", "preset:tiny-llama", "--threads", "1"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
                          start_new_session=True, env=env)  # its own process group, as a terminal gives it
    err = LineReader(up.stderr)
    try:
        address = err.wait_for(r"serving on (127\.0\.0\.1:\d+);", timeout=240).group(1)
        prompt = list(range(20, 60))
        chunks = []
        async with AsyncClient(address) as client:
            async for chunk in client.stream(token_ids=prompt, max_tokens=600, temperature=0, ignore_eos=True):
                chunks.append(chunk)
                if len(chunks) == 20:
                    os.killpg(up.pid, signal.SIGINT)
        assert [c.index for c in chunks] == list(range(600)) and chunks[-1].finish_reason == "length"
        assert up.wait(timeout=60) == 0
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
    err.wait_for(r"\[up\] stopping the cluster", timeout=5)
    with pytest.raises(ProcessLookupError):
        os.killpg(up.pid, 0)  # no member of the group is left
    assert set(segment_names()) <= before
