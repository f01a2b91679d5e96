"""Gateway text handling: incremental detokenization (multi-byte UTF-8) and stop strings."""

from __future__ import annotations

import pytest

from pdserve.sdk import AsyncClient
from services.gateway.text import IncrementalDetokenizer, StopStrings

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
