"""KV relay processes (prefill's ``kv_senders``, decode's ``kv_receivers``): transfers through them are
token-exact, a corrupt chunk is caught at a receiver, a killed relay is started again on its port and no
request is lost, and nothing is left behind."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import grpc
import pytest

from pdserve.kv import shm
from pdserve.sdk import AsyncClient
from pdserve.v1 import decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc
from tests.cluster import reference_greedy, start_cluster
from tests.conftest import get_loaded
from tests.test_kv_push import check_push_outcome, header, push, reserve, signed_transfer
from tests.test_observability import scrape, value

pytestmark = pytest.mark.slow  # real processes, each importing torch


def relays() -> dict[str, int]:
    """This process's running KV relay processes (the instances under test run in it): pid by role-index, read
    from their command lines (``python -m pdserve.kv.relays ROLE INDEX ...``)."""
    found = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                command = f.read().split(b"\0")
            with open(f"/proc/{entry}/stat") as f:
                state, ppid = f.read().rsplit(")", 1)[1].split()[:2]
        except OSError:
            continue
        if b"pdserve.kv.relays" in command and int(ppid) == os.getpid() and state != "Z":
            i = command.index(b"pdserve.kv.relays")
            found[f"{command[i + 1].decode()}-{command[i + 2].decode()}"] = int(entry)
    return found


def segments_of(pid: int) -> list[str]:
    return [n for n in shm.segment_names() if n.startswith(f"{shm.PREFIX}{pid}-")]


async def decode_stats(address: str) -> decode_pb2.DecodeStats:
    async with grpc.aio.insecure_channel(address) as channel:
        return await decode_pb2_grpc.DecodeStub(channel).GetStats(decode_pb2.GetStatsRequest(), timeout=5)


async def settled(address: str, timeout_s: float = 10.0) -> decode_pb2.DecodeStats:
    """Decode's stats once every request's blocks came back (a finished request frees them after its step)."""
    deadline = time.monotonic() + timeout_s
    while (stats := await decode_stats(address)).kv_blocks_used and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return stats


async def generate_all(cluster, prompts: list[list[int]]) -> None:
    async with AsyncClient(cluster.address, timeout=60) as client:
        results = await asyncio.gather(*(client.generate(token_ids=p, max_tokens=8, temperature=0, ignore_eos=True)
                                         for p in prompts))
    for prompt, result in zip(prompts, results):
        assert result.token_ids == reference_greedy(cluster.loaded, prompt, 8, ignore_eos=True)


@pytest.mark.parametrize("senders,receivers", [(0, 2), (2, 0), (2, 2)])
async def test_transfers_through_kv_relays_are_token_exact_and_a_killed_relay_is_replaced(senders, receivers):
    loaded = get_loaded("preset:tiny-llama")
    # Every prompt's KV crosses the transfer (none prefilled on decode for a cache hit), over two streams.
    cluster = await start_cluster(loaded, decode_options={"kv_receivers": receivers, "metrics_listen": "127.0.0.1:0"},
                                  prefill_options={"kv_transport": "grpc", "kv_streams": 2, "prefill_chunk_tokens": 16,
                                                   "kv_chunk_bytes": 4096, "kv_senders": senders,
                                                   "metrics_listen": "127.0.0.1:0"},
                                  gateway_options={"local_uncached_tokens": 0})
    decode = cluster.decode_address
    mine = set(segments_of(os.getpid()))  # the prefill instance's (it runs in this process)
    try:
        before = relays()
        assert sorted(before) == sorted([f"kv-sender-{i}" for i in range(senders)] +
                                        [f"kv-receiver-{i}" for i in range(receivers)])
        ports = list((await decode_stats(decode)).kv_receiver_ports)
        assert len(set(ports)) == receivers and 0 not in ports and cluster.decode.port not in ports

        await generate_all(cluster, [[5, 6, 7], list(range(30, 100)), list(range(200, 241))])
        stats = await settled(decode)
        assert (stats.transfers_completed, stats.kv_blocks_used, stats.waiting_for_kv) == (3, 0, 0)
        # Each receiver wrote decode's side through a segment of its own, kept for its next transfer; with
        # senders, prefill staged the KV in segments of its own for them to send from.
        for name, pid in before.items():
            if name.startswith("kv-receiver-"):
                assert segments_of(pid), f"{name} carried no transfer"
        assert bool(set(segments_of(os.getpid())) - mine) == bool(senders)

        victims = {name: before[name] for name in ("kv-sender-0", "kv-receiver-0") if name in before}
        for pid in victims.values():
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        # Until its replacement serves (a fresh interpreter importing torch: seconds), /metrics counts it down.
        for role, service in (("kv-sender", cluster.prefill), ("kv-receiver", cluster.decode)):
            if f"{role}-0" in victims:
                down = f'pdserve_kv_relays{{role="{role}",state="down"}}'
                while value(await asyncio.to_thread(scrape, f"127.0.0.1:{service.metrics_port}"), down) != 1:
                    assert time.monotonic() < deadline, f"a killed {role} not counted down"
                    await asyncio.sleep(0.05)
        for name, pid in victims.items():
            while relays().get(name, pid) == pid:
                assert time.monotonic() < deadline, f"{name} was not started again"
                await asyncio.sleep(0.2)
        while list((await decode_stats(decode)).kv_receiver_ports) != ports:  # serving again, on the same ports
            assert time.monotonic() < deadline, "a restarted receiver does not serve on its port"
            await asyncio.sleep(0.2)
        assert all(segments_of(pid) == [] for pid in victims.values())  # swept as it was replaced
        # Each instance's /metrics: all its relays running again (a sender once it serves), one replaced.
        for role, count, service in (("kv-sender", senders, cluster.prefill), ("kv-receiver", receivers, cluster.decode)):
            if count:
                running = f'pdserve_kv_relays{{role="{role}",state="running"}}'
                while value(text := await asyncio.to_thread(scrape, f"127.0.0.1:{service.metrics_port}"), running) < count:
                    assert time.monotonic() < deadline, f"{role}s: not all running again"
                    await asyncio.sleep(0.2)
                assert value(text, f'pdserve_kv_relays{{role="{role}",state="down"}}') == 0
                assert value(text, f'pdserve_kv_relay_restarts_total{{role="{role}"}}') == 1

        # No request is lost: one whose push met a dead relay's connection is pushed again.
        await generate_all(cluster, [list(range(300, 340)), [9, 8, 7, 6, 5, 4, 3], list(range(400, 480))])
        stats = await settled(decode)
        assert (stats.kv_blocks_used, stats.waiting_for_kv) == (0, 0)
        seen = {*before.values(), *relays().values()}
    finally:
        await cluster.stop()
    assert relays() == {}, "the relays stop with their instances"
    assert [n for pid in seen for n in segments_of(pid)] == [], "a relay's segments outlived it"


async def test_a_kv_receiver_checks_checksums_and_forwards_a_good_push():
    """A flipped byte fails the push at the receiver with DATA_LOSS before decode completes the transfer:
    the waiting request fails and its blocks come back; a good push through it generates."""
    cluster = await start_cluster(get_loaded("preset:tiny-llama"), decode_options={"kv_receivers": 1})
    try:
        (port,) = (await decode_stats(cluster.decode_address)).kv_receiver_ports
        async with grpc.aio.insecure_channel(cluster.decode_address) as to_decode, \
                grpc.aio.insecure_channel(f"127.0.0.1:{port}") as to_receiver:
            decode, receiver = decode_pb2_grpc.DecodeStub(to_decode), decode_pb2_grpc.DecodeStub(to_receiver)
            for corrupt_layer in (1, None):
                tid = f"through-a-receiver-{corrupt_layer}"
                waiting = await reserve(decode, tid)
                result = await push(receiver, signed_transfer(tid, corrupt_layer))
                await check_push_outcome(result, waiting, corrupt_layer)
                stats = await settled(cluster.decode_address)
                assert (stats.waiting_for_kv, stats.kv_blocks_used) == (0, 0)
    finally:
        await cluster.stop()


@pytest.mark.parametrize("victim", ["kv-sender-0", "kv-receiver-0"])
async def test_a_relay_killed_mid_transfer_loses_no_request_and_leaves_nothing(victim):
    """A relay stopped with a transfer in it (SIGSTOP: deterministically mid-transfer), then killed: the request
    is served exactly all the same (its push fails; the gateway tries again, around the dead relay until it
    serves again), and decode's blocks, prefill's in-flight KV and the dead relay's segments all go."""
    cluster = await start_cluster(get_loaded("preset:tiny-llama"), decode_options={"kv_receivers": 1},
                                  prefill_options={"kv_transport": "grpc", "kv_streams": 1, "kv_senders": 1,
                                                   "kv_chunk_bytes": 4096, "kv_keep_s": 2.0},
                                  gateway_options={"local_uncached_tokens": 0})
    decode = cluster.decode_address
    try:
        await generate_all(cluster, [[1, 2, 3]])  # the relays' connections are up: the next push gets into one
        pid = relays()[victim]
        os.kill(pid, signal.SIGSTOP)
        request = asyncio.create_task(generate_all(cluster, [list(range(50, 120))]))
        deadline = time.monotonic() + 20
        while (await decode_stats(decode)).waiting_for_kv == 0:  # reserved: its KV is on its way
            assert time.monotonic() < deadline and not request.done()
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        assert not request.done(), "the transfer went around the stopped relay"
        os.kill(pid, signal.SIGKILL)
        await asyncio.wait_for(request, 60)  # token-exact
        stats = await settled(decode)
        assert (stats.kv_blocks_used, stats.waiting_for_kv) == (0, 0)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{cluster.prefill.port}") as channel:
            stub = prefill_pb2_grpc.PrefillStub(channel)
            deadline = time.monotonic() + 10  # KV kept for a re-push is dropped after kv_keep_s
            while (await stub.GetStats(prefill_pb2.PrefillStatsRequest())).kv_inflight_bytes:
                assert time.monotonic() < deadline, "prefill still holds the transfer's KV"
                await asyncio.sleep(0.1)
        deadline = time.monotonic() + 10
        while segments_of(pid):  # swept as it is replaced
            assert time.monotonic() < deadline, "the killed relay's segments stayed"
            await asyncio.sleep(0.1)
    finally:
        await cluster.stop()


async def test_a_kv_sender_takes_only_its_prefill_instances_staging():
    """A KV sender forwards only a shared-memory stream, from a segment that exists, to a valid address;
    anything else is INVALID_ARGUMENT naming what was wrong (it listens on loopback only, behind the
    instance's credentials, but a bad stream must not become a request elsewhere)."""
    cluster = await start_cluster(get_loaded("preset:tiny-llama"), prefill_options={"kv_senders": 1})
    segment = shm.Segment.create(1 << 20)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{cluster.prefill.port}") as channel:
            stats = await prefill_pb2_grpc.PrefillStub(channel).GetStats(prefill_pb2.PrefillStatsRequest())
        (port,) = stats.kv_sender_ports
        forward = (("pdserve-kv-forward", cluster.decode_address),)
        cases = [([header("inline")], forward, "a KV sender sends from its prefill instance's shared memory"),
                 ([header("gone", shm_segment="pdserve-kv-1-0123456789abcdef")], forward, "cannot open"),
                 ([header("nowhere", shm_segment=segment.name)], (("pdserve-kv-forward", "not an address"),),
                  "pdserve-kv-forward metadata"),
                 ([header("no-target", shm_segment=segment.name)], (), "pdserve-kv-forward metadata")]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = decode_pb2_grpc.DecodeStub(channel)
            for messages, metadata, expected in cases:
                async def requests(messages=messages):
                    for m in messages:
                        yield m
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.PushKV(requests(), metadata=metadata, timeout=10)
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value
                assert expected in info.value.details()
    finally:
        segment.close()
        shm.unlink(segment.name)
        await cluster.stop()
