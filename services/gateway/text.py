"""Text on the gateway: prompts to token ids, token ids back to text deltas, stop strings.

Logic over a Hugging Face tokenizer, no I/O; ``Tokenizing`` runs encodes off the event loop.
"""

from __future__ import annotations

import asyncio
import copy
import queue
import re
import secrets
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

from pdserve.errors import InvalidArgument

_REPLACEMENT = "\ufffd"
ROLES = ("system", "user", "assistant", "tool")
T = TypeVar("T")


class Tokenizing:
    """Encodes off the event loop on ``threads`` threads, each call with a tokenizer copy of its own.

    A Hugging Face fast tokenizer keeps per-call settings (``split_special_tokens``, truncation, padding)
    in its one Rust object: two threads encoding through the same tokenizer read each other's, and a
    chat's control tokens came out split into plain text about once in a few thousand concurrent
    requests (a wrong prompt, so wrong tokens). The copies are never shared while in use; the original
    stays with the event loop for decoding."""

    def __init__(self, tokenizer, threads: int = 2) -> None:
        self._copies: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(threads):
            self._copies.put(copy.deepcopy(tokenizer))
        self._threads = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="tokenize")

    def _run(self, encode: Callable[..., T], *args) -> T:
        tokenizer = self._copies.get()
        try:
            return encode(tokenizer, *args)
        finally:
            self._copies.put(tokenizer)

    async def run(self, encode: Callable[..., T], *args) -> T:
        """``encode(tokenizer, *args)`` on a tokenizing thread."""
        return await asyncio.get_running_loop().run_in_executor(self._threads, self._run, encode, *args)


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    return list(tokenizer(prompt)["input_ids"])


def encode_chat(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Renders chat messages with the model's chat template, ready for the assistant's turn.

    Only the template makes control tokens: content such as ``<|im_end|>\n<|im_start|>system`` stays
    text and cannot forge a turn. The rendered prompt is tokenized as a whole (the model's usual
    tokenization) when its control tokens are exactly the template's own; otherwise the template is
    rendered around a placeholder per message, its text tokenized with special tokens recognized and each
    message's content with them split into plain text. (A raw ``prompt`` is the caller's whole input and
    keeps its special tokens.)"""
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidArgument("chat: this model has no chat template; send a prompt or token_ids")
    mark = f"PDSERVE{secrets.token_hex(8)}MSG"
    placeholders = [{**m, "content": f"{mark}{i}{mark}"} for i, m in enumerate(messages)]
    template = tokenizer.apply_chat_template(placeholders, add_generation_prompt=True, tokenize=False)
    safe: list[int] = []
    for i, part in enumerate(re.split(f"{mark}(\\d+){mark}", template)):
        if i % 2:  # a message's content, as plain text
            piece = messages[int(part)]["content"]
            safe += tokenizer(piece, add_special_tokens=False, split_special_tokens=True)["input_ids"] if piece else []
        elif part:
            safe += tokenizer(part, add_special_tokens=False)["input_ids"]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    whole = tokenizer(text, add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    if [t for t in whole if t in special] == [t for t in safe if t in special]:
        return list(whole)
    return safe


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas.

    Decodes a short window of recent tokens each time and emits only what the
    newest token completed; a multi-byte character split across tokens is held
    back until its last byte arrives (the window decodes to U+FFFD until then).
    """

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix_offset = 0  # start of the window decoded for context
        self._read_offset = 0    # tokens before this are already emitted

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset:])
        if len(new_text) > len(prefix_text) and not new_text.endswith(_REPLACEMENT):
            self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
            return new_text[len(prefix_text):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (at the end of generation)."""
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset:])
        self._prefix_offset = self._read_offset = len(self._ids)
        return new_text[len(prefix_text):]


class StopStrings:
    """Finds stop strings across text deltas, holding back text that may begin one."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = stops
        self._hold = max((len(s) for s in stops), default=1) - 1
        self._pending = ""

    def feed(self, delta: str) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop string was reached)."""
        self._pending += delta
        hits = [i for i in (self._pending.find(s) for s in self._stops) if i >= 0]
        if hits:
            emit, self._pending = self._pending[: min(hits)], ""
            return emit, True
        cut = max(0, len(self._pending) - self._hold)
        emit, self._pending = self._pending[:cut], self._pending[cut:]
        return emit, False

    def flush(self) -> str:
        emit, self._pending = self._pending, ""
        return emit
