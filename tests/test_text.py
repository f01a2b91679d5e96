"""Gateway text handling: incremental detokenization (multi-byte UTF-8) and stop strings."""

from __future__ import annotations

import asyncio
import threading

import pytest

from pdserve.sdk import AsyncClient
from services.gateway.text import IncrementalDetokenizer, StopStrings, Tokenizing, encode_chat

SAMPLES = ["Hello, world!", "naïve café 😀 — 日本語のテキスト", "emoji 👩‍👩‍👧 family", "ünïcödé\nnew line  two spaces"]


@pytest.mark.parametrize("text", SAMPLES)
def test_detokenizer_reassembles_multibyte_text_exactly(smol, text):
    tok = smol.info.tokenizer
    ids = tok(text, add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.push(i) for i in ids]
    deltas.append(detok.flush())
    assert "".join(deltas) == tok.decode(ids)
    assert not any("\ufffd" in d for d in deltas), "a split character leaked out as U+FFFD"


def test_multibyte_character_split_across_tokens_is_held_back(smol):
    tok = smol.info.tokenizer
    ids = tok("😀", add_special_tokens=False)["input_ids"]
    assert len(ids) > 1, "the emoji should span several byte-level tokens"
    detok = IncrementalDetokenizer(tok)
    assert [detok.push(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.push(ids[-1]) == "😀"


def test_stop_string_across_deltas():
    stops = StopStrings(("END",))
    out = []
    for delta in ["abc E", "N", "D and more"]:
        text, hit = stops.feed(delta)
        out.append(text)
        if hit:
            break
    assert "".join(out) == "abc " and hit


def test_text_that_only_looks_like_a_stop_prefix_is_released():
    stops = StopStrings(("STOP",))
    first, hit = stops.feed("xx ST")
    assert (first, hit) == ("xx", False)  # "ST" might begin "STOP"
    second, hit = stops.feed("ART")
    assert not hit
    assert first + second + stops.flush() == "xx START"


async def test_stop_string_ends_generation_through_the_cluster(smol_cluster):
    async with AsyncClient(smol_cluster.address) as client:
        full = await client.generate(messages=[{"role": "user", "content": "Count from 1 to 10."}],
                                     max_tokens=48, temperature=0)
        assert "5" in full.text
        stopped = await client.generate(messages=[{"role": "user", "content": "Count from 1 to 10."}],
                                        max_tokens=48, temperature=0, stop=["5"])
    assert stopped.finish_reason == "stop"
    assert stopped.text == full.text[: full.text.index("5")]
    assert stopped.token_ids == full.token_ids[: len(stopped.token_ids)]
    assert len(stopped.token_ids) < len(full.token_ids)


async def test_concurrent_encodes_never_share_a_tokenizer(smol):
    """A fast tokenizer keeps split_special_tokens in its one Rust object: two threads encoding through it
    read each other's setting (a chat's control tokens came out as plain text about once in a few
    thousand concurrent requests, and the model answered a different prompt)."""
    tok = smol.info.tokenizer
    tokenizing = Tokenizing(tok, threads=2)
    both_in = threading.Barrier(2, timeout=10)
    used: list[object] = []

    def encode(tokenizer, messages):
        used.append(tokenizer)
        both_in.wait()  # the two calls run at the same time
        return encode_chat(tokenizer, messages)

    chats = [[{"role": "user", "content": "Hi!"}], [{"role": "user", "content": "x <|im_start|>system y"}]]
    got = await asyncio.gather(*[tokenizing.run(encode, m) for m in chats])
    assert len({id(t) for t in used}) == 2 and tok not in used
    assert got == [encode_chat(tok, m) for m in chats]
    many = [[{"role": "user", "content": f"{i} <|im_start|>" if i % 2 else f"Hi number {i}!"}] for i in range(300)]
    assert await asyncio.gather(*[tokenizing.run(encode_chat, m) for m in many]) == [encode_chat(tok, m) for m in many]
