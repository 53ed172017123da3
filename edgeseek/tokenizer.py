"""Byte-level BPE tokenizer from GGUF metadata (`tokenizer.ggml.model = gpt2`), as llama.cpp runs it.

The steps follow llama.cpp's src/llama-vocab.cpp and src/unicode.cpp:
1. special tokens (control, user-defined) are cut out of the text first, longest first;
2. each remaining fragment is split by the pre-tokenizer's regexes, applied one after another,
   every regex splitting the pieces of the previous one (matches and the gaps between them both
   become pieces);
3. each piece is mapped to GPT-2's byte-to-unicode alphabet and merged by BPE rank.
"""
from __future__ import annotations

import codecs
from functools import lru_cache

import regex

from .errors import GGUFError, UnsupportedError

# Token types (tokenizer.ggml.token_type), llama.cpp's llama_token_type.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizer regexes, from llama.cpp's llm_tokenizer_bpe constructor. Where llama.cpp uses
# ECMAScript `$` (end of input only) Python needs `\Z`.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Non-ASCII characters as \u escapes: an editor's Unicode normalization would change them.
_DEEPSEEK_LLM = [
    r"[\r\n]",
    r"\s?[A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df\U0001e900-\U0001e943]+",
    r"\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+",
    r"\s+\Z",
    r"[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+",
    r"\p{N}+",
]
_DEEPSEEK_V3 = [
    r"\p{N}{1,3}",
    r"[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
    r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""",
]
_DEEPSEEK_CODER = [
    r"[\r\n]",
    r"\s?\p{L}+",
    r"\s?\p{P}+",
    r"[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+",
    r"\p{N}",
]
_DEFAULT = [r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"]

# pre name -> (regexes, ignore_merges): the names llama.cpp maps to each regex set.
PRE_TOKENIZERS: dict[str, tuple[list[str], bool]] = {}


def _pre(names: str, exprs: list[str], ignore_merges: bool = False):
    for name in names.split():
        PRE_TOKENIZERS[name] = (exprs, ignore_merges)


_pre("default", _DEFAULT)
_pre("llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2 jina-v5-nano", [_LLAMA3], True)
_pre("dbrx smaug-bpe", [_LLAMA3])
_pre("deepseek-llm", _DEEPSEEK_LLM)
_pre("deepseek-v3 hunyuan-dense joyai-llm hy_v4", _DEEPSEEK_V3)
_pre("deepseek-coder", _DEEPSEEK_CODER)
_pre("starcoder refact command-r smollm codeshell exaone minerva-7b mellum2", [r"\p{N}", _GPT2])
_pre("gpt-2 phi-2 jina-es jina-de gigachat jina-v2-es jina-v2-de a.x-4.0 mellum modern-bert "
     "jina-v1-en jina-v2-code roberta-bpe mpt olmo jais trillion granite-docling exaone4", [_GPT2])
_pre("qwen2 deepseek-r1-qwen kormo f2llmv2 megrez stablelm2 hunyuan solar-open", [_QWEN2])

# Texts llama.cpp also treats as end of generation when they are control tokens (llama-vocab.cpp).
_EOG_TEXTS = {"<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>",
              "<EOT>", "_<EOT>", "<|end_of_text|>", "<end_of_utterance>"}


@lru_cache(maxsize=1)
def _byte_alphabet() -> tuple[dict[int, str], dict[str, int]]:
    """GPT-2's reversible map of the 256 byte values to printable unicode characters."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return chars, {c: b for b, c in chars.items()}


def _vocab(gguf) -> tuple[list[str], list[int], list[str]]:
    """Token texts, token types and merges of a GGUF file, checked to fit together (the element
    types were checked when the file was opened)."""
    tokens = gguf.meta("tokenizer.ggml.tokens")
    if not tokens:
        raise GGUFError(f"{gguf.path}: metadata key 'tokenizer.ggml.tokens' is empty")
    types = gguf.meta("tokenizer.ggml.token_type", None)
    if types is None:
        types = [NORMAL] * len(tokens)
    elif len(types) != len(tokens):
        raise GGUFError(f"{gguf.path}: metadata key 'tokenizer.ggml.token_type' has {len(types)} entries, "
                        f"but tokenizer.ggml.tokens has {len(tokens)}")
    merges = gguf.meta("tokenizer.ggml.merges", [])
    for i, m in enumerate(merges):
        a, _, b = m.partition(" ")
        if not (a and b):
            raise GGUFError(f"{gguf.path}: metadata key 'tokenizer.ggml.merges' element {i} is {m[:40]!r}, "
                            "not two symbols joined by a space")
    return tokens, list(types), merges


class Tokenizer:
    def __init__(self, tokens: list[str], types: list[int], merges: list[str], pre: str,
                 bos_id: int | None, eos_id: int | None, add_bos: bool, add_eos: bool = False,
                 eog_ids: tuple[int, ...] = (), origin: str = "tokenizer"):
        if pre not in PRE_TOKENIZERS:
            raise UnsupportedError(f"{origin}: pre-tokenizer {pre!r} is not supported; supported: "
                                   + ", ".join(sorted(PRE_TOKENIZERS)))
        exprs, self.ignore_merges = PRE_TOKENIZERS[pre]
        self.pre = pre
        self._regexes = [regex.compile(e) for e in exprs]
        self.tokens = tokens
        self.types = types
        self.vocab = {t: i for i, t in enumerate(tokens)}
        # keyed by the merge's text "a b" as the file has it (symbols never hold a space: byte-level BPE
        # maps it to another character): 100k tuple keys took 0.13 s of every load
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.bos_id, self.eos_id = bos_id, eos_id
        self.add_bos, self.add_eos = add_bos, add_eos
        self._byte_chars, self._char_bytes = _byte_alphabet()
        # Special tokens cut out of text before BPE, longest first (llama.cpp's cache_special_tokens).
        special = [i for i, t in enumerate(types) if t in (CONTROL, USER_DEFINED, UNKNOWN)]
        special.sort(key=lambda i: -len(tokens[i]))
        self._special = [(tokens[i], i, types[i]) for i in special if tokens[i]]
        eog = {i for i in (eos_id, *eog_ids) if i is not None and i >= 0}
        eog |= {i for t, i, ty in self._special if ty == CONTROL and t in _EOG_TEXTS}
        self.stop_ids = frozenset(eog)
        self._word_cache: dict[str, list[int]] = {}

    @classmethod
    def from_gguf(cls, gguf) -> "Tokenizer":
        model = gguf.meta("tokenizer.ggml.model", None)
        if model is None:
            raise GGUFError(f"{gguf.path}: metadata key 'tokenizer.ggml.model' is missing")
        if model != "gpt2":
            raise UnsupportedError(f"{gguf.path}: tokenizer model {model!r} is not supported (only 'gpt2' byte-level BPE)")
        tokens, types, merges = _vocab(gguf)
        pre = gguf.meta("tokenizer.ggml.pre", "default")
        special = {k: gguf.meta(f"tokenizer.ggml.{k}_token_id", None) for k in ("bos", "eos", "eot", "eom")}
        for k, i in special.items():
            if i is not None and i >= len(tokens):
                raise GGUFError(f"{gguf.path}: metadata key 'tokenizer.ggml.{k}_token_id' is {i}, past the end of "
                                f"the vocabulary ({len(tokens)} tokens)")
        ids = [special["eot"], special["eom"]]
        return cls(tokens, types, merges, pre, special["bos"], special["eos"],
                   bool(gguf.meta("tokenizer.ggml.add_bos_token", pre in PRE_TOKENIZERS and PRE_TOKENIZERS[pre][1])),
                   bool(gguf.meta("tokenizer.ggml.add_eos_token", False)),
                   tuple(i for i in ids if i is not None), origin=str(gguf.path))

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    # --- encoding -------------------------------------------------------------------------------
    def encode(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        ids: list[int] = []
        if add_special and self.add_bos and self.bos_id is not None:
            ids.append(self.bos_id)
        for fragment, special_id in self._partition(text, parse_special):
            if special_id is not None:
                ids.append(special_id)
            else:
                for piece in self.pre_tokenize(fragment):
                    ids.extend(self._bpe_word(piece))
        if add_special and self.add_eos and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    def _partition(self, text: str, parse_special: bool):
        """(text, None) and (token text, id) fragments: special tokens cut out, longest first."""
        fragments: list[tuple[str, int | None]] = [(text, None)]
        for tok_text, tok_id, tok_type in self._special:
            if not parse_special and tok_type != USER_DEFINED:
                continue
            if tok_text not in text:
                continue
            out = []
            for frag, sid in fragments:
                if sid is not None or tok_text not in frag:
                    out.append((frag, sid))
                    continue
                parts = frag.split(tok_text)
                for k, part in enumerate(parts):
                    if part:
                        out.append((part, None))
                    if k < len(parts) - 1:
                        out.append((tok_text, tok_id))
            fragments = out
        return fragments

    def pre_tokenize(self, text: str) -> list[str]:
        pieces = [text] if text else []
        for rx in self._regexes:
            out = []
            for p in pieces:
                pos = 0
                for m in rx.finditer(p):
                    if m.start() > pos:
                        out.append(p[pos:m.start()])
                    if m.end() > m.start():
                        out.append(m.group())
                    pos = m.end()
                if pos < len(p):
                    out.append(p[pos:])
            pieces = out
        return pieces

    def _bpe_word(self, piece: str) -> list[int]:
        cached = self._word_cache.get(piece)
        if cached is not None:
            return cached
        word = "".join(self._byte_chars[b] for b in piece.encode("utf-8"))
        if self.ignore_merges and word in self.vocab:
            ids = [self.vocab[word]]
        else:
            ids = []
            for sym in self._merge(word):
                tid = self.vocab.get(sym)
                if tid is not None:
                    ids.append(tid)
                else:  # llama.cpp falls back to the tokens of the symbol's single characters
                    ids.extend(self.vocab[c] for c in sym if c in self.vocab)
        if len(self._word_cache) < 100_000:
            self._word_cache[piece] = ids
        return ids

    def _merge(self, word: str) -> list[str]:
        symbols = list(word)
        ranks = self.ranks
        while len(symbols) > 1:
            best, best_rank = None, None
            for i in range(len(symbols) - 1):
                r = ranks.get(symbols[i] + " " + symbols[i + 1])
                if r is not None and (best_rank is None or r < best_rank):
                    best, best_rank = i, r
            if best is None:
                break
            a, b = symbols[best], symbols[best + 1]
            merged, i = [], 0
            while i < len(symbols):  # merge every (a, b) pair, left to right
                if i < len(symbols) - 1 and symbols[i] == a and symbols[i + 1] == b:
                    merged.append(a + b)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return symbols

    # --- decoding -------------------------------------------------------------------------------
    def token_to_bytes(self, token_id: int, special: bool = False) -> bytes:
        """The bytes of one token, as llama.cpp's token_to_piece: control tokens only if `special`."""
        ty = self.types[token_id]
        text = self.tokens[token_id]
        if ty in (CONTROL, UNKNOWN):
            return text.encode("utf-8") if special else b""
        if ty == USER_DEFINED:
            return text.encode("utf-8")
        cb = self._char_bytes
        try:
            return bytes(cb[c] for c in text)
        except KeyError:
            return text.encode("utf-8")

    def decode(self, ids, skip_special: bool = True) -> str:
        data = b"".join(self.token_to_bytes(i, special=not skip_special) for i in ids)
        return data.decode("utf-8", errors="replace")

    def stream_decoder(self, skip_special: bool = True) -> "StreamDecoder":
        return StreamDecoder(self, skip_special)


class StreamDecoder:
    """Text of tokens as they come, never half a UTF-8 character: incomplete bytes wait for the next."""

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True):
        self.tokenizer = tokenizer
        self.special = not skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token_id: int) -> str:
        return self._utf8.decode(self.tokenizer.token_to_bytes(token_id, self.special))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)
