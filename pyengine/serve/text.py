"""Text in and out of the server: the checkpoint folder's tokenizer when it has one, else ids only.

With a tokenizer (tokenizer.json / tokenizer_config.json beside config.json, read by transformers'
AutoTokenizer, nothing downloaded) prompts may be text, outputs are decoded text, and a chat
template (when the tokenizer has one) turns /v1/chat/completions messages into a prompt. Without
one, prompts must be token ids and an output's text is its ids written as decimal numbers joined
by spaces (every response also carries its ids).
"""

from __future__ import annotations

import os
from typing import Any

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class TextCodec:
    """Ids <-> text for one model (a tokenizer, or the ids-only stand-in)."""

    def __init__(self, tokenizer: Any | None = None):
        self.tokenizer = tokenizer

    @classmethod
    def for_folder(cls, folder: str | None) -> TextCodec:
        """The folder's tokenizer when it ships one; the ids-only codec otherwise."""
        if folder is None or not any(os.path.exists(os.path.join(folder, f)) for f in TOKENIZER_FILES):
            return cls(None)
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(folder, local_files_only=True))

    @property
    def has_text(self) -> bool:
        return self.tokenizer is not None

    @property
    def has_chat(self) -> bool:
        return self.tokenizer is not None and bool(getattr(self.tokenizer, "chat_template", None))

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(out, dict) or hasattr(out, "keys"):  # transformers 5 returns a BatchEncoding
            out = out["input_ids"]
        return [int(t) for t in out]

    def decode(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            return " ".join(str(t) for t in ids)
        return self.tokenizer.decode(ids, skip_special_tokens=True)


class IncrementalText:
    """A request's output text as its ids arrive: the new part after each id, never a half
    character (a byte-level tokenizer's partial UTF-8 decodes to U+FFFD: held back until the
    next id completes it), never the start of what may become a stop string (held back until
    it cannot), and cut before the first stop string."""

    def __init__(self, codec: TextCodec, stop: tuple[str, ...] = ()):
        self.codec, self.stop = codec, tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.text = ""
        """The text handed out so far."""
        self.full = ""
        """The whole decoded text (up to a stop string)."""
        self.stopped = False
        """A stop string was found: the text ends before it and no more ids count."""

    def add(self, ids: list[int]) -> str:
        """Append ids; return the text they release (may be empty)."""
        if self.stopped or not ids:
            return ""
        self.ids.extend(ids)
        full = self.codec.decode(self.ids)
        longest = max(map(len, self.stop), default=0)
        cut = _first_stop(full, self.stop, start=max(0, len(self.full) - longest))
        if cut is not None:
            self.full, self.stopped = full[:cut], True
            return self._release(len(self.full))
        self.full = full
        ready = len(full) - _stop_prefix_len(full, self.stop)
        if full[:ready].endswith("\ufffd"):
            ready = len(full[:ready].rstrip("\ufffd"))
        return self._release(ready)

    def finish(self) -> str:
        """The text still held back, once no more ids come."""
        return self._release(len(self.full))

    def _release(self, upto: int) -> str:
        if upto <= len(self.text) or not self.full.startswith(self.text):
            return ""
        new, self.text = self.full[len(self.text):upto], self.full[:upto]
        return new


def _first_stop(text: str, stops: tuple[str, ...], start: int) -> int | None:
    found = [i for s in stops if (i := text.find(s, start)) >= 0]
    return min(found) if found else None


def _stop_prefix_len(text: str, stops: tuple[str, ...]) -> int:
    """Characters at the end of `text` that begin some stop string (they may grow into it)."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best
