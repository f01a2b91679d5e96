"""Protobuf <-> plain dataclasses, in one place for all three services.

Servicers call these at the edge; everything behind them sees dataclasses.
"""

from __future__ import annotations

import re

from pdserve.config import address_problem
from pdserve.engine.sampling import SamplingParams
from pdserve.errors import InvalidArgument
from pdserve.kv.wire import QUANTIZATIONS, KVLayout, StreamInfo
from pdserve.v1 import common_pb2, decode_pb2

def sampling_from_proto(msg: common_pb2.SamplingParams, default_seed: int = 0) -> SamplingParams:
    """Validated engine sampling settings (the token-choice part of the message)."""
    return SamplingParams(
        temperature=msg.temperature if msg.HasField("temperature") else 1.0,
        top_p=msg.top_p if msg.HasField("top_p") else 1.0,
        top_k=msg.top_k,
        seed=msg.seed if msg.HasField("seed") else default_seed,
    )


def sampling_to_proto(p: SamplingParams) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, seed=p.seed)


def layout_from_proto(header: decode_pb2.KVHeader) -> KVLayout:
    if not header.transfer_id:
        raise InvalidArgument("header.transfer_id: must not be empty")
    return KVLayout(header.transfer_id, header.num_layers, header.num_tokens, header.kv_heads, header.head_dim, header.dtype)


def layout_to_proto(layout: KVLayout) -> decode_pb2.KVHeader:
    return decode_pb2.KVHeader(transfer_id=layout.transfer_id, num_layers=layout.num_layers,
                               num_tokens=layout.num_tokens, kv_heads=layout.kv_heads,
                               head_dim=layout.head_dim, dtype=layout.dtype)


def stream_info_from_proto(header: decode_pb2.KVHeader) -> StreamInfo:
    if header.quantization not in QUANTIZATIONS:
        raise InvalidArgument(f"header.quantization: {header.quantization!r} unsupported (one of {QUANTIZATIONS})")
    if header.quantization and header.shm_segment:
        raise InvalidArgument("header.quantization: int8 travels over gRPC only, not shared memory")
    if header.cuda_ipc and (header.shm_segment or header.quantization):
        raise InvalidArgument("header.cuda_ipc: no shared-memory segment, no quantization")
    return StreamInfo(header.num_streams or 1, header.stream_index, header.shm_segment, header.checksums,
                      header.quantization, header.cuda_ipc)


MAX_ID_CHARS = 256  # request and transfer ids
# Ids end up in logs, metric labels, trace attributes and file-like names: letters, digits and a few separators.
_ID = re.compile(r"[A-Za-z0-9_.:/-]*")


def check_id(value: str, field: str, required: bool = True) -> None:
    if required and not value:
        raise InvalidArgument(f"{field}: must not be empty")
    if len(value) > MAX_ID_CHARS:
        raise InvalidArgument(f"{field}: at most {MAX_ID_CHARS} characters, got {len(value)}")
    if not _ID.fullmatch(value):
        raise InvalidArgument(f"{field}: only letters, digits and '_', '.', ':', '/', '-' are allowed")


def check_address(value: str, field: str) -> None:
    """``value`` must be host:port (what a peer is reached at)."""
    problem = address_problem(value)
    if problem:
        raise InvalidArgument(f"{field}: {problem}")


def check_token_ids(token_ids: list[int], vocab_size: int, field: str = "token_ids") -> None:
    if not token_ids:
        raise InvalidArgument(f"{field}: must not be empty")
    bad = next((t for t in token_ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InvalidArgument(f"{field}: id {bad} outside the vocabulary [0, {vocab_size})")
