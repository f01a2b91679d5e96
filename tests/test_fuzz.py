"""Fuzzing every RPC of the three services: random-valued, malformed and oversized messages each get a
precise status code (never UNKNOWN or INTERNAL), no service goes down, the KV pool returns to empty, and
a well-formed request afterwards is still served token-exact."""

from __future__ import annotations

import asyncio
import collections
import math
import random

import grpc
import pytest
from google.protobuf import descriptor as pb_descriptor

from pdserve.rpc import MAX_MESSAGE_BYTES, check_health
from pdserve.sdk import AsyncClient
from pdserve.tls import NO_AUTH, ClusterAuth, TlsFiles, make_certificates
from pdserve.v1 import common_pb2, decode_pb2, decode_pb2_grpc, gateway_pb2, prefill_pb2
from tests.cluster import reference_greedy, start_cluster
from tests.conftest import get_loaded

MODEL = "preset:tiny-llama"
SEED = 20261122
MESSAGES_PER_RPC = 120
# Codes that mean "the server understood what was wrong" (or, for a request that happened to be valid,
# that it was served or stopped by the client's short deadline).
PRECISE = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
           grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION,
           grpc.StatusCode.DATA_LOSS, grpc.StatusCode.DEADLINE_EXCEEDED}
F = pb_descriptor.FieldDescriptor


def random_value(rng: random.Random, field: F, depth: int):
    t = field.type
    if t in (F.TYPE_INT32, F.TYPE_SINT32, F.TYPE_SFIXED32, F.TYPE_ENUM):
        return rng.choice([0, 1, -1, 2, 7, 2**31 - 1, -2**31, rng.randrange(-2**31, 2**31)])
    if t in (F.TYPE_UINT32, F.TYPE_FIXED32):
        return rng.choice([0, 1, 2, 2**32 - 1, rng.randrange(2**32)])
    if t in (F.TYPE_INT64, F.TYPE_SINT64, F.TYPE_SFIXED64):
        return rng.choice([0, 1, -1, 2**63 - 1, -2**63, rng.randrange(-2**63, 2**63)])
    if t in (F.TYPE_UINT64, F.TYPE_FIXED64):
        return rng.choice([0, 1, 2**64 - 1, rng.randrange(2**64)])
    if t in (F.TYPE_FLOAT, F.TYPE_DOUBLE):
        return rng.choice([0.0, -0.0, 1.0, -1.0, 0.5, 1e30, -1e30, math.nan, math.inf, -math.inf, rng.uniform(-5, 5)])
    if t == F.TYPE_BOOL:
        return rng.random() < 0.5
    if t == F.TYPE_STRING:
        return rng.choice(["", "a", "\x00", "hello world", "é漢字🙂" * rng.randrange(1, 50), "x" * rng.randrange(1, 20000),
                           "".join(chr(rng.randrange(1, 0xD7FF)) for _ in range(rng.randrange(1, 200)))])
    if t == F.TYPE_BYTES:
        return rng.randbytes(rng.choice([0, 1, 7, 64, 4096]))
    raise AssertionError(f"unhandled field type {t}")


def random_message(rng: random.Random, cls, depth: int = 0):
    """A message of ``cls`` with a random subset of its fields set to random, often extreme, values."""
    msg = cls()
    for field in cls.DESCRIPTOR.fields:
        if rng.random() < 0.35:
            continue
        repeated = field.label == F.LABEL_REPEATED if hasattr(field, "label") else field.is_repeated
        if field.type == F.TYPE_MESSAGE:
            if depth >= 3 or (field.message_type.GetOptions().map_entry):
                continue
            sub = getattr(msg, field.name)
            if repeated:
                for _ in range(rng.randrange(0, 4)):
                    sub.add().CopyFrom(random_message(rng, sub.add().__class__, depth + 1))
            else:
                sub.CopyFrom(random_message(rng, sub.__class__, depth + 1))
                if not sub.ListFields():
                    sub.SetInParent()
            continue
        if repeated:
            n = rng.choice([0, 1, 3, 17, 300, 50_000]) if field.type != F.TYPE_STRING else rng.randrange(0, 20)
            values = [random_value(rng, field, depth) for _ in range(min(n, 400))]
            values = (values * (n // max(1, len(values)) + 1))[:n]
            getattr(msg, field.name).extend(values)
        else:
            setattr(msg, field.name, random_value(rng, field, depth))
    return msg


def mutate(rng: random.Random, seed):
    """A copy of a valid ``seed`` with one or two fields (perhaps inside a sub-message) set to random values."""
    msg = type(seed)()
    msg.CopyFrom(seed)
    for _ in range(rng.randrange(1, 3) if msg.DESCRIPTOR.fields else 0):
        target = msg
        field = rng.choice(target.DESCRIPTOR.fields)
        if field.type == F.TYPE_MESSAGE and rng.random() < 0.7:
            target = getattr(target, field.name)
            if hasattr(target, "add"):  # a repeated message field: replace with random ones
                del target[:]
                continue
            field = rng.choice(target.DESCRIPTOR.fields)
        if field.type == F.TYPE_MESSAGE:
            target.ClearField(field.name)
            continue
        if hasattr(getattr(target, field.name), "extend"):
            values = getattr(target, field.name)
            del values[:]
            values.extend(random_value(rng, field, 0) for _ in range(rng.choice([0, 1, 5, 2000])))
        else:
            setattr(target, field.name, random_value(rng, field, 0))
    return msg


def garbage(rng: random.Random, valid: bytes) -> bytes:
    """Random bytes, or a valid message truncated or with bytes flipped."""
    kind = rng.randrange(3)
    if kind == 0 or not valid:
        return rng.randbytes(rng.randrange(1, 512))
    if kind == 1:
        return valid[: rng.randrange(0, len(valid))] + b"\xff"
    data = bytearray(valid)
    for _ in range(rng.randrange(1, 4)):
        data[rng.randrange(len(data))] = rng.randrange(256)
    return bytes(data)


async def call(channel: grpc.aio.Channel, method: str, payload: bytes, streaming_reply: bool,
               timeout: float = 2.0) -> grpc.StatusCode:
    """Sends raw bytes; returns the status code (reading the whole reply stream)."""
    try:
        if streaming_reply:
            async for _ in channel.unary_stream(method)(payload, timeout=timeout):
                pass
        else:
            await channel.unary_unary(method)(payload, timeout=timeout)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def push(channel: grpc.aio.Channel, messages: list[bytes], timeout: float = 3.0) -> grpc.StatusCode:
    async def gen():
        for m in messages:
            yield m
    try:
        await channel.stream_unary("/pdserve.v1.Decode/PushKV")(gen(), timeout=timeout)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def push_messages(rng: random.Random, kv) -> list[bytes]:
    """A PushKV stream: garbage, random-valued messages, or a plausible header followed by bad chunks."""
    kind = rng.randrange(4)
    if kind == 0:
        return [rng.randbytes(rng.randrange(1, 2048)) for _ in range(rng.randrange(1, 5))]
    if kind == 1:
        return [random_message(rng, decode_pb2.KVMessage).SerializeToString() for _ in range(rng.randrange(1, 5))]
    header = decode_pb2.KVMessage(header=decode_pb2.KVHeader(
        transfer_id=rng.choice(["nope", "", "x" * 300]), num_layers=kv.num_layers, num_tokens=rng.choice([0, 1, 5, 10**9]),
        kv_heads=kv.kv_heads, head_dim=kv.head_dim, dtype=rng.choice(["float32", "int4", ""])))
    rest = [garbage(rng, random_message(rng, decode_pb2.KVMessage).SerializeToString()) for _ in range(rng.randrange(0, 4))]
    return [header.SerializeToString()] + rest


def rpcs(decode_address: str) -> list:
    """(service, method, a valid request to mutate, whether replies stream) for every RPC."""
    greedy = common_pb2.SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    return [
        ("gateway", "/pdserve.v1.Gateway/Generate",
         gateway_pb2.GenerateRequest(token_ids=gateway_pb2.TokenIds(ids=[5, 6, 7]), sampling=greedy), True),
        ("gateway", "/pdserve.v1.Gateway/GetModelInfo", gateway_pb2.GetModelInfoRequest(), False),
        # The internal listener, to a member: bogus instances may join, and the gateway must route around
        # them (health checks, retries).
        ("gateway-internal", "/pdserve.v1.GatewayInternal/Heartbeat",
         gateway_pb2.HeartbeatRequest(role="decode", address="127.0.0.1:9", interval_s=0.5), False),
        ("prefill", "/pdserve.v1.Prefill/Prefill",
         prefill_pb2.PrefillRequest(request_id="p", token_ids=[5, 6, 7], sampling=greedy,
                                    decode_address=decode_address, transfer_id="never-reserved"), True),
        # A valid reservation whose KV never comes: the client's deadline (or the lease) must free it.
        ("decode", "/pdserve.v1.Decode/Generate",
         decode_pb2.DecodeRequest(request_id="d", transfer_id="t", prompt_tokens=3, sampling=greedy, max_tokens=4),
         True),
        ("decode", "/pdserve.v1.Decode/GetStats", decode_pb2.GetStatsRequest(), False),
    ]


@pytest.mark.slow
async def test_fuzzed_requests_get_precise_codes_and_leave_nothing_behind(tmp_path):
    """The members talk mutual TLS, as deployed; the fuzzer holds a member's certificate, so its garbage
    reaches every servicer (the client-facing port is plaintext)."""
    loaded = get_loaded(MODEL)
    make_certificates(tmp_path)
    # A KV receiver process too: its PushKV is fuzzed like decode's.
    cluster = await start_cluster(loaded, decode_options={"kv_lease_s": 2.0, "kv_receivers": 1}, tls_dir=tmp_path)
    ports = {"gateway": cluster.gateway.port, "gateway-internal": cluster.gateway.internal_port,
             "prefill": cluster.prefill.port, "decode": cluster.decode.port}
    options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    member = ClusterAuth(TlsFiles.load(f"{tmp_path}/client.pem", f"{tmp_path}/client-key.pem", f"{tmp_path}/ca.pem"))
    auths = {name: NO_AUTH if name == "gateway" else member for name in ports}
    channels = {name: auths[name].channel(f"127.0.0.1:{port}", options) for name, port in ports.items()}
    stats = await decode_pb2_grpc.DecodeStub(channels["decode"]).GetStats(decode_pb2.GetStatsRequest())
    ports["decode-kv-receiver"], auths["decode-kv-receiver"] = stats.kv_receiver_ports[0], member
    channels["decode-kv-receiver"] = member.channel(f"127.0.0.1:{ports['decode-kv-receiver']}", options)
    rng = random.Random(SEED)
    codes: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    try:
        for service, method, seed, streaming in rpcs(f"127.0.0.1:{ports['decode']}"):
            sends = []
            for i in range(MESSAGES_PER_RPC):
                msg = (random_message(rng, type(seed)) if i % 2 else mutate(rng, seed)).SerializeToString()
                sends.append(garbage(rng, msg) if i % 3 == 2 else msg)
            # Several at once, as a real client population would send them.
            for start in range(0, len(sends), 8):
                results = await asyncio.gather(*(call(channels[service], method, p, streaming)
                                                 for p in sends[start:start + 8]))
                codes[method].update(results)
            # Oversized: past the 64 MiB receive limit.
            codes[method][await call(channels[service], method, b"\x0a" + b"\xff" * (MAX_MESSAGE_BYTES + 16),
                                     streaming, timeout=30)] += 1
        for target in ("decode", "decode-kv-receiver"):
            for _ in range(60):
                codes[f"{target}: /pdserve.v1.Decode/PushKV"][await push(channels[target],
                                                                         push_messages(rng, loaded.info.kv))] += 1
        print("\nfuzz status codes per RPC:")
        for method, counter in codes.items():
            print(f"  {method}: " + ", ".join(f"{code.name} {n}" for code, n in counter.most_common()))
        for method, counter in codes.items():
            imprecise = {code.name: n for code, n in counter.items() if code not in PRECISE}
            assert not imprecise, f"{method}: {imprecise}"
            assert counter[grpc.StatusCode.INVALID_ARGUMENT] > 0, method
        assert codes["/pdserve.v1.Gateway/Generate"][grpc.StatusCode.RESOURCE_EXHAUSTED] >= 1  # the oversized one

        # Nobody went down, nothing leaked: every service still serving, the pool drains (leases of
        # reservations whose transfer never came expire), and a real request is served exactly.
        for name, port in ports.items():
            assert await check_health(f"127.0.0.1:{port}", auth=auths[name])
        stub = decode_pb2_grpc.DecodeStub(channels["decode"])
        for _ in range(100):
            stats = await stub.GetStats(decode_pb2.GetStatsRequest())
            if stats.kv_blocks_used == 0 and stats.running == 0 and stats.waiting_for_kv == 0:
                break
            await asyncio.sleep(0.1)
        assert (stats.kv_blocks_used, stats.running, stats.waiting_for_kv, stats.queued) == (0, 0, 0, 0)
        prompt = [5, 17, 99, 3, 250]
        async with AsyncClient(cluster.address) as client:
            result = await client.generate(token_ids=prompt, max_tokens=12, temperature=0, ignore_eos=True)
        assert result.token_ids == reference_greedy(loaded, prompt, 12, ignore_eos=True)
    finally:
        for channel in channels.values():
            await channel.close()
        await cluster.stop()
