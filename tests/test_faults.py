"""Fault injection with real processes: 2 prefill + 2 decode instances, many concurrent greedy requests,
instances killed, hung and restarted under them. Every request completes token-identical to a fault-free
run, every token index arrives exactly once and in order.

Each test prints one summary line:
``faults: N injected, requests: M, completed: M, token-exact: M, lost: 0, duplicated: 0``.
"""

from __future__ import annotations

import asyncio
import signal

import grpc
import pytest

from bench.fault_loop import MAX_TOKENS, REQUESTS, Run, cluster_spec, member, wait_for_tokens
from bench.fault_loop import workload as make_workload
from pdserve.tls import ClusterAuth
from pdserve_cli.cluster import LocalCluster
from pdserve.v1 import decode_pb2, decode_pb2_grpc
from tests.conftest import get_loaded

pytestmark = [pytest.mark.slow, pytest.mark.faults]

MODEL = "preset:tiny-llama"
SUMMARIES: list[dict] = []  # every run's summary; conftest prints their total at the end of the session


def workload(seed: int) -> list[list[int]]:
    return make_workload(get_loaded(MODEL), seed)


def summarize(run: Run, faults: int) -> dict:
    result = run.summary(get_loaded(MODEL), faults)
    SUMMARIES.append(result)
    return result


@pytest.fixture
async def cluster():
    cluster = LocalCluster(cluster_spec())
    try:
        await cluster.start()
        await cluster.wait_healthy(timeout_s=120)
        yield cluster
    finally:
        cluster.stop()


async def decode_stats(address: str, auth: ClusterAuth) -> decode_pb2.DecodeStats:
    async with auth.channel(address) as channel:
        return await decode_pb2_grpc.DecodeStub(channel).GetStats(decode_pb2.GetStatsRequest(), timeout=5)


def expect_all_exact(result: dict[str, int]) -> None:
    n = result["requests"]
    assert (result["completed"], result["token-exact"], result["lost"], result["duplicated"]) == (n, n, 0, 0), result


async def test_kill_9_a_decode_instance_mid_generation_then_restart_it(cluster):
    run = Run(cluster.gateway_address, workload(1))
    victim = member(cluster, "decode-0")

    async def kill_decode(run: Run) -> None:
        await wait_for_tokens(run, REQUESTS * 5)
        victim.process.send_signal(signal.SIGKILL)

    await run.run(kill_decode)
    expect_all_exact(summarize(run, faults=1))
    # Restarted on the same address, it rejoins: the gateway's health checks find it and it gets new work.
    victim.process.wait()
    cluster.restart("decode-0")
    await cluster.wait_healthy(timeout_s=120)
    second = Run(cluster.gateway_address, workload(5)[:8])

    async def nothing(run: Run) -> None:
        pass

    await asyncio.sleep(1.5)  # a few health probes find it serving
    await second.run(nothing)
    expect_all_exact(summarize(second, faults=0))
    stats = await decode_stats(victim.address, cluster.auth)
    assert stats.transfers_completed > 0, "the restarted instance got no work"
    assert (stats.waiting_for_kv, stats.running, stats.kv_blocks_used) == (0, 0, 0)


async def test_kill_9_a_prefill_instance_under_load(cluster):
    run = Run(cluster.gateway_address, workload(2))

    async def kill_prefill(run: Run) -> None:
        member(cluster, "prefill-0").process.send_signal(signal.SIGKILL)  # while the first prompts are in flight

    await run.run(kill_prefill)
    expect_all_exact(summarize(run, faults=1))


async def test_a_hung_decode_instance_is_left_and_rejoins_after_sigcont(cluster):
    run = Run(cluster.gateway_address, workload(3))
    hung = member(cluster, "decode-1")

    async def hang_then_resume(run: Run) -> None:
        await wait_for_tokens(run, REQUESTS * 5)
        hung.process.send_signal(signal.SIGSTOP)  # a hung peer, not a dead one: the token timeout moves its requests
        await wait_for_tokens(run, REQUESTS * MAX_TOKENS // 2, timeout_s=120)
        hung.process.send_signal(signal.SIGCONT)

    await run.run(hang_then_resume)
    expect_all_exact(summarize(run, faults=1))
    # The resumed instance serves again: a second round spreads over both decode instances.
    second = Run(cluster.gateway_address, workload(4)[:8])

    async def nothing(run: Run) -> None:
        await asyncio.sleep(1.5)  # a few health probes find it serving

    before = await decode_stats(hung.address, cluster.auth)
    await second.run(nothing)
    expect_all_exact(summarize(second, faults=0))
    after = await decode_stats(hung.address, cluster.auth)
    assert after.transfers_completed > before.transfers_completed, "the resumed instance got no new work"
    assert (after.waiting_for_kv, after.running, after.kv_blocks_used) == (0, 0, 0), "its old requests were freed"


async def test_kill_9_the_gateway_mid_stream_the_sdk_resumes_after_its_restart(cluster):
    run = Run(cluster.gateway_address, workload(6)[:20])

    async def kill_and_restart_gateway(run: Run) -> None:
        await wait_for_tokens(run, 20 * 10)
        gateway = member(cluster, "gateway")
        gateway.process.send_signal(signal.SIGKILL)
        gateway.process.wait()
        cluster.restart("gateway")  # same address; each client stream resumes from its last index

    await run.run(kill_and_restart_gateway)
    expect_all_exact(summarize(run, faults=1))
    for name in ("decode-0", "decode-1"):  # the dead gateway's calls were cancelled: nothing held
        stats = await decode_stats(member(cluster, name).address, cluster.auth)
        assert (stats.waiting_for_kv, stats.running, stats.kv_blocks_used) == (0, 0, 0), name


@pytest.fixture
def netns():
    """A network namespace joined to this one by a veth pair (10.231.<n>.1 here, .2 there); skips where the
    machine does not allow it (not root, no iproute2)."""
    import os
    import shutil
    import subprocess

    n = os.getpid() % 250
    name, here, there = f"pdserve{os.getpid()}", f"pdh{os.getpid()}"[:15], f"pdn{os.getpid()}"[:15]
    setup = [["ip", "netns", "add", name], ["ip", "link", "add", here, "type", "veth", "peer", "name", there],
             ["ip", "link", "set", there, "netns", name], ["ip", "addr", "add", f"10.231.{n}.1/30", "dev", here],
             ["ip", "link", "set", here, "up"],
             ["ip", "netns", "exec", name, "ip", "addr", "add", f"10.231.{n}.2/30", "dev", there],
             ["ip", "netns", "exec", name, "ip", "link", "set", there, "up"],
             ["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"]]
    if shutil.which("ip") is None:
        pytest.skip("network namespaces: no ip command (iproute2)")
    for cmd in setup:
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
            pytest.skip(f"network namespaces not available here: {' '.join(cmd)}: {done.stderr.strip()}")
    try:
        yield name, here, f"10.231.{n}.2"
    finally:
        subprocess.run(["ip", "link", "del", here], capture_output=True)
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


async def test_a_decode_instance_cut_off_by_a_network_partition_is_left_and_rejoins_when_healed(netns):
    import subprocess

    name, link, address = netns
    cluster = LocalCluster(cluster_spec(decode_netns=((name, address),)))
    try:
        await cluster.start()
        await cluster.wait_healthy(timeout_s=120)
        cut_off = member(cluster, "decode-0")
        assert cut_off.address.startswith(address)
        run = Run(cluster.gateway_address, workload(7))

        async def partition(run: Run) -> None:
            await wait_for_tokens(run, REQUESTS * 5)
            subprocess.run(["ip", "link", "set", link, "down"], check=True)  # packets to it go nowhere

        await run.run(partition)
        expect_all_exact(summarize(run, faults=1))
        subprocess.run(["ip", "link", "set", link, "up"], check=True)
        await asyncio.sleep(2.0)  # health probes reach it again
        before = await decode_stats(cut_off.address, cluster.auth)
        second = Run(cluster.gateway_address, workload(8)[:8])

        async def nothing(run: Run) -> None:
            pass

        await second.run(nothing)
        expect_all_exact(summarize(second, faults=0))
        after = await decode_stats(cut_off.address, cluster.auth)
        assert after.transfers_completed > before.transfers_completed, "the healed instance got no new work"
        for _ in range(300):  # cancellations sent during the partition arrive when TCP retransmits them
            if (after.waiting_for_kv, after.running, after.kv_blocks_used) == (0, 0, 0):
                break
            await asyncio.sleep(0.1)
            after = await decode_stats(cut_off.address, cluster.auth)
        assert (after.waiting_for_kv, after.running, after.kv_blocks_used) == (0, 0, 0), "its old requests were freed"
    finally:
        cluster.stop()
