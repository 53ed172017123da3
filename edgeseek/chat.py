"""A conversation with a model: messages, the chat template, a KV cache kept between turns, and the
slash commands that change them.

A new turn renders the whole conversation through the model's template, and only the tokens after
the longest prefix already in the cache are processed. Frontends render what `send` yields and what
`command` returns; nothing here prints.
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

HELP = """Commands:
  /help                 this help
  /clear                forget the conversation
  /system [TEXT]        show or set the system prompt (clears the conversation)
  /set NAME VALUE       sampling option: temperature top_k top_p min_p repeat_penalty seed max_tokens
  /stats                the last reply's speed
  /lora FILE [SCALE]    run with a LoRA adapter (GGUF; or FILE:SCALE); /lora off: the base model; /lora: which
  /save FILE, /load FILE  the conversation as JSON
  /bye                  leave (or Ctrl+D)
Multi-line input: start and end it with three double quotes (\"\"\"). Ctrl+C stops a reply."""

ALIASES = {"temp": "temperature", "num_predict": "max_tokens"}  # ollama's names
INTEGER_OPTIONS = ("top_k", "repeat_last_n", "seed", "max_tokens")


def build_messages(system: str | None, turns: list[dict]) -> list[dict]:
    """The messages a chat template renders: the system prompt (if any) first, then the turns."""
    return ([{"role": "system", "content": system}] if system else []) + list(turns)


def chat_prompt_ids(engine: Engine, messages: list[dict]) -> list[int]:
    """Token ids of `messages` rendered by the model's chat template, the assistant's turn opened."""
    return prompt_ids(engine, engine.chat_template.render(messages, add_generation_prompt=True))


def single_turn_ids(engine: Engine, text: str, system: str | None = None, raw: bool = False) -> list[int]:
    """The prompt of a one-message exchange: `text` as the user's turn through the chat template, or
    as plain text (BOS per the file's metadata) when `raw` or when the model has no template."""
    if raw or engine.chat_template is None:
        return engine.tokenizer.encode(text)
    return chat_prompt_ids(engine, build_messages(system, [{"role": "user", "content": text}]))


def prompt_ids(engine: Engine, rendered: str) -> list[int]:
    """Token ids of a rendered chat prompt: BOS added per the model's metadata, and not twice when
    the template already wrote it (as llama.cpp strips a template's leading BOS)."""
    tok = engine.tokenizer
    ids = tok.encode(rendered, add_special=True, parse_special=True)
    if len(ids) >= 2 and tok.bos_id is not None and ids[0] == ids[1] == tok.bos_id:
        ids = ids[1:]
    return ids


@dataclass
class CommandResult:
    """What a slash command did, for a frontend to show."""

    message: str = ""  # for the user; "" when there is nothing to say
    error: bool = False  # the command failed; `message` says why
    leave: bool = False  # end the chat
    stats: GenerationResponse | None = None  # /stats: the last reply's final response, to render


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
        return build_messages(self.system, self.messages)

    def send(self, text: str) -> Iterator[GenerationResponse]:
        """Streams the reply to `text`. The reply (even when stopped early) joins the conversation."""
        self.messages.append({"role": "user", "content": text})
        reply = []
        try:
            ids = chat_prompt_ids(self.engine, self.conversation())
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

    def set_option(self, name: str, value: str) -> str:
        """`/set NAME VALUE`: a sampling option or max_tokens, from its text; returns the canonical
        name. ValueError names what is wrong."""
        name = ALIASES.get(name, name)
        if not name or not value:
            raise ValueError("usage: /set NAME VALUE")
        cast = int if name in INTEGER_OPTIONS else float
        try:
            parsed = cast(value)
        except ValueError:
            raise ValueError(f"{name}: not a number: {value!r}") from None
        if name == "max_tokens":
            self.max_tokens = parsed
        else:
            self.sampler = self.sampler.updated(**{name: parsed})
        return name

    def command(self, line: str) -> CommandResult:
        """Runs one slash command line ("/set temperature 0")."""
        cmd, _, arg = line.strip().partition(" ")
        arg = arg.strip()
        handler = _COMMANDS.get(cmd)
        if handler is None:
            return CommandResult(f"Unknown command {cmd}; /help lists them.")
        return handler(self, cmd, arg)

    def _leave(self, cmd: str, arg: str) -> CommandResult:
        return CommandResult(leave=True)

    def _help(self, cmd: str, arg: str) -> CommandResult:
        return CommandResult(HELP)

    def _clear(self, cmd: str, arg: str) -> CommandResult:
        self.clear()
        return CommandResult("Conversation cleared.")

    def _system(self, cmd: str, arg: str) -> CommandResult:
        if not arg:
            return CommandResult(self.system or "(no system prompt)")
        self.system = arg
        self.clear()
        return CommandResult("System prompt set; conversation cleared.")

    def _set(self, cmd: str, arg: str) -> CommandResult:
        name, _, value = arg.partition(" ")
        try:
            name = self.set_option(name, value.strip())
        except ValueError as e:
            return CommandResult(str(e), error=True)
        return CommandResult(f"Set {name} = {value.strip()}.")

    def _stats(self, cmd: str, arg: str) -> CommandResult:
        return CommandResult(stats=self.last) if self.last else CommandResult("No reply yet.")

    def _lora(self, cmd: str, arg: str) -> CommandResult:
        """`/lora FILE [SCALE]`, `/lora off`, `/lora`: the adapter changes without reloading the
        base; the conversation stays, the cache is recomputed on the next turn."""
        if not arg:
            on = ", ".join(f"{a.name} (scale {a.scale:g})" for a in self.context.adapters)
            return CommandResult(f"LoRA: {on or 'off'}")
        if arg == "off":
            self.context.use_adapters(())
            return CommandResult("LoRA off: the base model.")
        from .lora import parse_spec

        try:
            path, scale = parse_spec(arg)  # FILE SCALE or FILE:SCALE, read as --lora reads them
            adapter = self.engine.lora.get(path, scale)
        except EdgeseekError as e:
            return CommandResult(str(e), error=True)
        self.context.use_adapters((adapter,))
        return CommandResult(f"LoRA {path} at scale {scale:g}.")

    def _save_or_load(self, cmd: str, arg: str) -> CommandResult:
        if not arg:
            return CommandResult(f"usage: {cmd} FILE")
        try:
            if cmd == "/save":
                self.save(arg)
                return CommandResult(f"Saved {len(self.messages)} messages to {arg}.")
            self.load(arg)
            return CommandResult(f"Loaded {len(self.messages)} messages from {arg}.")
        except (EdgeseekError, OSError) as e:
            return CommandResult(str(e), error=True)


_COMMANDS = {
    "/bye": ChatSession._leave, "/exit": ChatSession._leave, "/quit": ChatSession._leave,
    "/help": ChatSession._help, "/?": ChatSession._help,
    "/clear": ChatSession._clear,
    "/system": ChatSession._system,
    "/set": ChatSession._set,
    "/stats": ChatSession._stats,
    "/lora": ChatSession._lora,
    "/save": ChatSession._save_or_load, "/load": ChatSession._save_or_load,
}


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
