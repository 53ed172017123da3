"""The chat template a model file carries (`tokenizer.chat_template`), rendered in jinja2's sandbox.

Templates come from model files, so they are untrusted: the immutable sandbox refuses attribute
access to internals (`__class__`, `__globals__`) and mutation of passed-in objects. The globals and
filters are those Hugging Face templates expect (`raise_exception`, `strftime_now`, `tojson`).
"""
from __future__ import annotations

import json
from datetime import datetime

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import EdgeseekError, GGUFError


def _line(text) -> str:
    """A message from the template (its own words, via raise_exception) on one line."""
    return " ".join(str(text).split())


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Hugging Face's tojson: no HTML escaping (jinja's built-in one escapes <, >, &, ').
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


class ChatTemplate:
    def __init__(self, source: str, bos_token: str = "", eos_token: str = "", origin: str = "template"):
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.origin = origin
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise EdgeseekError(f"{origin}: chat template syntax error at line {e.lineno}: {_line(e.message)}") from e

    @classmethod
    def from_gguf(cls, gguf) -> "ChatTemplate":
        source = gguf.meta("tokenizer.chat_template", None)
        if source is None:
            raise GGUFError(f"{gguf.path}: metadata key 'tokenizer.chat_template' is missing")
        tokens = gguf.meta("tokenizer.ggml.tokens", [])

        def token(key):
            i = gguf.meta(key, None)
            return tokens[i] if i is not None and 0 <= i < len(tokens) else ""

        return cls(source, token("tokenizer.ggml.bos_token_id"), token("tokenizer.ggml.eos_token_id"),
                   origin=f"{gguf.path}: tokenizer.chat_template")

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **extra) -> str:
        try:
            return self._template.render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token, eos_token=self.eos_token, **extra,
            )
        except jinja2.exceptions.SecurityError as e:
            raise EdgeseekError(f"{self.origin}: the chat template tried an unsafe operation ({_line(e)})") from e
        except jinja2.TemplateError as e:
            raise EdgeseekError(f"{self.origin}: the chat template failed: {_line(e)}") from e
        except (ArithmeticError, LookupError, TypeError, ValueError, RecursionError) as e:
            # The template is data from the file: its expressions can fail like any Python code.
            raise EdgeseekError(f"{self.origin}: the chat template failed: {type(e).__name__}: {_line(e)}") from e
