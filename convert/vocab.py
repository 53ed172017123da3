"""The tokenizer of a checkpoint (tokenizer.json, tokenizer_config.json) written as GGUF keys, as
llama.cpp's converter writes it (TextModel.get_vocab_base, _set_vocab_gpt2, gguf.SpecialVocab), without
transformers: the `pre` name is found by encoding llama.cpp's probe text with our own emulation of the
Hugging Face pipeline and looking up its hash, or failing that by the pre-tokenizer's behaviour.
"""
from __future__ import annotations

import logging
import unicodedata
from hashlib import sha256
from pathlib import Path

import regex
from gguf import GGUFWriter, SpecialVocab, TokenType

from edgeseek.errors import UnsupportedError
from edgeseek.tokenizer import PRE_TOKENIZERS, Tokenizer, _byte_alphabet

from .checkpoint import MissingFileError, read_json
from .pre_hashes import HASHES, PROBE_TEXT

# The regex of Hugging Face's ByteLevel pre-tokenizer with use_regex (tokenizers byte_level.rs).
_BYTE_LEVEL_RE = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


class _CannotEmulate(Exception):
    """A tokenizer.json component this emulation does not implement."""


def _looks_special(token: str) -> bool:
    """llama.cpp TextModel.does_token_look_special: added tokens that ought to be control tokens."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<｜") and token.endswith("｜>"))
            or (token.startswith("<unused") and token.endswith(">")))


# ------------------------------------------------------------------ Hugging Face pipeline emulation

def _normalize(norm: dict | None, text: str) -> str:
    if not norm:
        return text
    t = norm["type"]
    if t == "Sequence":
        for n in norm.get("normalizers", []):
            text = _normalize(n, text)
        return text
    if t in ("NFC", "NFD", "NFKC", "NFKD"):
        return unicodedata.normalize(t, text)
    if t == "Lowercase":
        return text.lower()
    if t == "Prepend":
        return norm["prepend"] + text
    if t == "Replace" and "String" in norm["pattern"]:
        return text.replace(norm["pattern"]["String"], norm["content"])
    raise _CannotEmulate(f"normalizer {t}")


def _split(pieces: list[str], pattern: str, behavior: str, invert: bool) -> list[str]:
    rx = regex.compile(pattern)
    out = []
    for p in pieces:
        spans, pos = [], 0  # (text, is_match)
        for m in rx.finditer(p):
            if m.start() > pos:
                spans.append((p[pos:m.start()], False))
            if m.end() > m.start():
                spans.append((m.group(), True))
            pos = m.end()
        if pos < len(p):
            spans.append((p[pos:], False))
        if invert:
            spans = [(s, not is_m) for s, is_m in spans]
        if behavior == "Isolated":
            out += [s for s, _ in spans]
        elif behavior == "Removed":
            out += [s for s, is_m in spans if not is_m]
        elif behavior == "MergedWithPrevious":
            acc: list[str] = []
            for s, is_m in spans:
                if is_m and acc:
                    acc[-1] += s
                else:
                    acc.append(s)
            out += acc
        elif behavior == "MergedWithNext":
            acc, carry = [], ""
            for s, is_m in spans:
                if is_m:
                    carry += s
                else:
                    acc.append(carry + s)
                    carry = ""
            out += acc + ([carry] if carry else [])
        elif behavior == "Contiguous":
            acc, prev = [], None
            for s, is_m in spans:
                if is_m and prev:
                    acc[-1] += s
                else:
                    acc.append(s)
                prev = is_m
            out += acc
        else:
            raise _CannotEmulate(f"Split behavior {behavior}")
    return out


def pre_tokenize(pre: dict | None, pieces: list[str]) -> tuple[list[str], bool]:
    """Pieces after a Hugging Face pre-tokenizer, and whether it maps bytes (ByteLevel)."""
    if not pre:
        return pieces, False
    t = pre["type"]
    if t == "Sequence":
        byte_level = False
        for p in pre.get("pretokenizers", []):
            pieces, b = pre_tokenize(p, pieces)
            byte_level |= b
        return pieces, byte_level
    if t == "Split":
        pat = pre["pattern"]
        pattern = pat["Regex"] if "Regex" in pat else regex.escape(pat["String"])
        return _split(pieces, pattern, pre.get("behavior", "Isolated"), pre.get("invert", False)), False
    if t == "ByteLevel":
        if pre.get("add_prefix_space", False):
            pieces = [p if p.startswith(" ") else " " + p for p in pieces]
        if pre.get("use_regex", True):
            pieces = _split(pieces, _BYTE_LEVEL_RE, "Isolated", False)
        return pieces, True
    if t == "Digits":
        return _split(pieces, r"\p{N}" if pre.get("individual_digits") else r"\p{N}+", "Isolated", False), False
    raise _CannotEmulate(f"pre-tokenizer {t}")


class HFTokenizer:
    """Enough of Hugging Face `tokenizers` (byte-level BPE) to encode a text as transformers would."""

    def __init__(self, tok: dict, config: dict):
        model = tok.get("model") or {}
        if model.get("type", "BPE") != "BPE":
            raise _CannotEmulate(f"model {model.get('type')}")
        self.tok, self.config = tok, config
        self.vocab: dict[str, int] = dict(model.get("vocab", {}))
        self.ranks = {}  # keyed by "a b", as the runtime's Tokenizer keys them (byte-level symbols hold no space)
        for i, m in enumerate(model.get("merges", [])):
            a, b = m.split(" ", 1) if isinstance(m, str) else m
            self.ranks.setdefault(f"{a} {b}", i)
        self.ignore_merges = bool(model.get("ignore_merges", False))
        self.added = {a["content"]: a["id"] for a in tok.get("added_tokens", [])}

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for frag, special in self._added_split(text):
            if special is not None:
                ids.append(special)
                continue
            pieces, byte_level = pre_tokenize(self.tok.get("pre_tokenizer"), [_normalize(self.tok.get("normalizer"), frag)])
            if not byte_level:
                raise _CannotEmulate("a BPE model without a ByteLevel pre-tokenizer")
            chars, _ = _byte_alphabet()
            for p in pieces:
                w = "".join(chars[b] for b in p.encode("utf-8"))
                if self.ignore_merges and w in self.vocab:
                    ids.append(self.vocab[w])
                    continue
                for sym in self._merge(w):
                    if sym not in self.vocab:
                        raise _CannotEmulate(f"symbol {sym!r} outside the vocabulary")
                    ids.append(self.vocab[sym])
        return self._post(ids)

    def _merge(self, w: str) -> list[str]:
        m = Tokenizer.__new__(Tokenizer)
        m.ranks = self.ranks
        return Tokenizer._merge(m, w)

    def _added_split(self, text: str):
        frags: list[tuple[str, int | None]] = [(text, None)]
        for content in sorted(self.added, key=len, reverse=True):
            out = []
            for f, sid in frags:
                if sid is not None or content not in f:
                    out.append((f, sid))
                    continue
                parts = f.split(content)
                for k, part in enumerate(parts):
                    if part:
                        out.append((part, None))
                    if k < len(parts) - 1:
                        out.append((content, self.added[content]))
            frags = out
        return frags

    def _special_id(self, key: str) -> int | None:
        entry = self.config.get(key)
        content = entry.get("content") if isinstance(entry, dict) else entry
        return self.added.get(content, self.vocab.get(content)) if content else None

    def _post(self, ids: list[int]) -> list[int]:
        # transformers 5 rebuilds the post-processor from add_bos_token / add_eos_token when
        # tokenizer_config.json names either (tokenization_utils_tokenizers.update_post_processor)
        if "add_bos_token" in self.config or "add_eos_token" in self.config:
            bos, eos = self._special_id("bos_token"), self._special_id("eos_token")
            head = [bos] if self.config.get("add_bos_token") and bos is not None else []
            tail = [eos] if self.config.get("add_eos_token") and eos is not None else []
            return head + ids + tail
        return self._apply_post(self.tok.get("post_processor"), ids)

    def _apply_post(self, post: dict | None, ids: list[int]) -> list[int]:
        if not post:
            return ids
        t = post["type"]
        if t == "Sequence":
            for p in post.get("processors", []):
                ids = self._apply_post(p, ids)
            return ids
        if t == "ByteLevel":
            return ids
        if t == "TemplateProcessing":
            out = []
            for item in post.get("single", []):
                if "Sequence" in item:
                    out += ids
                else:
                    out += post["special_tokens"][item["SpecialToken"]["id"]]["ids"]
            return out
        if t in ("RobertaProcessing", "BertProcessing"):
            return [post["cls"][1]] + ids + [post["sep"][1]]
        raise _CannotEmulate(f"post-processor {t}")


# ------------------------------------------------------------------ pre-tokenizer identification

def identify_pre(tok: dict, config: dict, preferred: tuple[str, ...], origin: str) -> tuple[str, str]:
    """(pre name, how it was found). First llama.cpp's own way: the hash of the token ids of its probe
    text. A vocabulary llama.cpp does not list (a fine-tune's, a test's) falls back to comparing how the
    pre-tokenizer splits the probe text with each regex set llama.cpp implements."""
    reason = ""
    try:
        ids = HFTokenizer(tok, config).encode(PROBE_TEXT)
        digest = sha256(str(ids).encode()).hexdigest()
        if digest in HASHES:
            name, ref = HASHES[digest]
            return name, f"hash of the probe text's tokens matches {ref}"
        reason = f"hash {digest[:12]}... is not in llama.cpp's table"
    except _CannotEmulate as e:
        reason = f"cannot emulate {e}"
    try:
        pieces, _ = pre_tokenize(tok.get("pre_tokenizer"), [_normalize(tok.get("normalizer"), PROBE_TEXT)])
    except _CannotEmulate as e:
        raise UnsupportedError(f"{origin}: cannot identify the pre-tokenizer ({reason}; {e})") from None
    ignore_merges = bool((tok.get("model") or {}).get("ignore_merges", False))
    same = []
    for name, (exprs, im) in PRE_TOKENIZERS.items():
        if im == ignore_merges and Tokenizer([], [], [], name, None, None, False).pre_tokenize(PROBE_TEXT) == pieces:
            same.append(name)
    if not same:
        raise UnsupportedError(f"{origin}: the pre-tokenizer is none that llama.cpp implements ({reason}, and its "
                               "splitting of llama.cpp's probe text matches no known regex set)")
    pick = next((n for n in preferred if n in same), sorted(same)[0])
    return pick, f"{reason}; splits the probe text as {pick!r} does"


# ------------------------------------------------------------------ GGUF keys

def write_vocab(w: GGUFWriter, folder: Path, config: dict, preferred: tuple[str, ...]) -> dict:
    """Writes tokenizer.* keys; returns a summary (pre name and how it was identified, sizes)."""
    tok_path = folder / "tokenizer.json"
    if not tok_path.is_file():
        raise MissingFileError(f"{tok_path}: tokenizer.json is missing (only byte-level BPE tokenizers in "
                               "tokenizer.json are converted; no sentencepiece tokenizer.model)")
    tok = read_json(tok_path, "tokenizer.json")
    tcfg_path = folder / "tokenizer_config.json"
    tcfg = read_json(tcfg_path, "tokenizer_config.json") if tcfg_path.is_file() else {}
    model = tok.get("model") or {}
    if model.get("type", "BPE") != "BPE":
        raise UnsupportedError(f"{tok_path}: tokenizer model {model.get('type')!r} is not converted (byte-level BPE only)")

    vocab = dict(model.get("vocab", {}))
    added = {a["content"]: a for a in tok.get("added_tokens", [])}
    for a in added.values():
        vocab[a["content"]] = a["id"]
    reverse = {i: t for t, i in vocab.items()}
    n_vocab = config.get("vocab_size") or len(reverse)
    if reverse and max(reverse) >= n_vocab:
        raise UnsupportedError(f"{tok_path}: token id {max(reverse)} is beyond config.json vocab_size {n_vocab}")
    tokens, types = [], []
    for i in range(n_vocab):  # llama.cpp TextModel.get_vocab_base
        t = reverse.get(i)
        if t is None:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif t in added:
            if added[t].get("special") or _looks_special(t):
                types.append(TokenType.CONTROL)
            else:
                t = t.replace("\u2581", " ")  # pre-normalized user-defined spaces
                types.append(TokenType.USER_DEFINED)
            tokens.append(t)
        else:
            tokens.append(t)
            types.append(TokenType.NORMAL)

    pre, how = identify_pre(tok, tcfg, preferred, str(tok_path))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    # merges, special token ids, add_bos/add_eos, chat template: gguf-py's reader of these files, the
    # one llama.cpp's converter uses
    log = logging.getLogger("gguf.vocab")
    level, log.level = log.level, logging.ERROR  # its warnings about unusual templates are not the user's business
    try:
        special = SpecialVocab(folder, load_merges=True)
        special.add_to_gguf(w, quiet=True)
    finally:
        log.setLevel(level)
    return {"pre": pre, "pre_identified_by": how, "n_tokens": len(tokens), "n_merges": len(special.merges),
            "special_token_ids": dict(special.special_token_ids), "chat_template": special.chat_template is not None}
