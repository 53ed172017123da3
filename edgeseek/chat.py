"""A conversation with a model: messages, the chat template, and a KV cache kept between turns.

A new turn renders the whole conversation through the model's template, and only the tokens after
the longest prefix already in the cache are processed. Frontends render what `send` yields.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from .engine import Engine
from .errors import EdgeseekError
from .generation import GenerationResponse, stream_generate
from .sampler import SamplerConfig


@dataclass
class ChatSession:
    engine: Engine
    system: str | None = None
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    max_tokens: int = 1024
    messages: list[dict] = field(default_factory=list)  # user / assistant turns, system excluded
    last: GenerationResponse | None = None  # the final response of the last reply (its stats)

    def __post_init__(self):
        if self.engine.chat_template is None:
            raise EdgeseekError(f"{self.engine.path}: the model has no chat template (tokenizer.chat_template)")
        self.context = self.engine.new_context()

    def conversation(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.messages

    def send(self, text: str) -> Iterator[GenerationResponse]:
        """Streams the reply to `text`. The reply (even when stopped early) joins the conversation."""
        self.messages.append({"role": "user", "content": text})
        prompt = self.engine.chat_template.render(self.conversation(), add_generation_prompt=True)
        ids = prompt_ids(self.engine, prompt)
        reply = []
        try:
            for r in stream_generate(self.engine, ids, max_tokens=self.max_tokens,
                                     sampler=self.sampler, context=self.context):
                reply.append(r.text)
                self.last = r
                yield r
        except BaseException:
            if not reply:  # nothing came back: the turn did not happen
                self.messages.pop()
                raise
            self.messages.append({"role": "assistant", "content": "".join(reply)})
            raise
        self.messages.append({"role": "assistant", "content": "".join(reply)})

    def clear(self) -> None:
        self.messages.clear()
        self.context.reset()
        self.last = None

    def save(self, path: str | os.PathLike) -> None:
        data = {"system": self.system, "messages": self.messages, "model": str(self.engine.path)}
        Path(path).write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")

    def load(self, path: str | os.PathLike) -> None:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            messages = data["messages"]
            if not all(isinstance(m, dict) and m.get("role") in ("user", "assistant", "system")
                       and isinstance(m.get("content"), str) for m in messages):
                raise ValueError("each message needs a role (user/assistant/system) and a string content")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise EdgeseekError(f"{path}: not a saved conversation ({e})") from e
        self.system = data.get("system")
        self.messages = list(messages)


def prompt_ids(engine: Engine, rendered: str) -> list[int]:
    """Token ids of a rendered chat prompt: BOS added per the model's metadata, and not twice when
    the template already wrote it (as llama.cpp strips a template's leading BOS)."""
    tok = engine.tokenizer
    ids = tok.encode(rendered, add_special=True, parse_special=True)
    if len(ids) >= 2 and tok.bos_id is not None and ids[0] == ids[1] == tok.bos_id:
        ids = ids[1:]
    return ids


class ThinkSplitter:
    """Splits streamed text into ("think", text) and ("answer", text) parts at <think> / </think>.

    R1-style models open their reply with a <think> block; tags split across chunks are held back.
    """

    OPEN, CLOSE = "<think>", "</think>"

    def __init__(self):
        self.thinking = False
        self.pending = ""

    def feed(self, text: str) -> list[tuple[str, str]]:
        self.pending += text
        parts = []
        while True:
            tag = self.CLOSE if self.thinking else self.OPEN
            i = self.pending.find(tag)
            if i >= 0:
                parts.append((self._kind(), self.pending[:i]))
                self.pending = self.pending[i + len(tag):]
                self.thinking = not self.thinking
                continue
            hold = next((k for k in range(min(len(tag) - 1, len(self.pending)), 0, -1)
                         if self.pending.endswith(tag[:k])), 0)
            parts.append((self._kind(), self.pending[: len(self.pending) - hold]))
            self.pending = self.pending[len(self.pending) - hold:]
            return [(k, t) for k, t in parts if t]

    def flush(self) -> list[tuple[str, str]]:
        out, self.pending = self.pending, ""
        return [(self._kind(), out)] if out else []

    def _kind(self) -> str:
        return "think" if self.thinking else "answer"
