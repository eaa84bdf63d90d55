"""CLIP's tokenizer in pure Python (no torch, no transformers): how many of the text encoder's 77
positions a prompt takes.

Every CLIP and Stable Diffusion 1.x text encoder reads at most :data:`CONTEXT_LENGTH` tokens, start
and end included, and silently drops the rest. The API counts a prompt here, with CLIP's real
byte-pair vocabulary (shipped beside this module, see ``LICENSE-CLIP-BPE.txt``), to refuse one
that would be cut; the ``tiny`` preset's tokenizer is built from the same vocabulary, so it counts
exactly as the real one does.
"""

from __future__ import annotations

import functools
import gzip
import html
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import regex  # CLIP's pre-tokenizer needs Unicode classes (\p{L}, \p{N}); the standard library's re has none

VOCAB_PATH = Path(__file__).resolve().parent / "bpe_simple_vocab_16e6.txt.gz"
CONTEXT_LENGTH = 77  # positions of CLIP's text encoder, start and end tokens included
START, END = "<|startoftext|>", "<|endoftext|>"
_MERGES = 49152 - 256 - 2  # the merges CLIP uses (the file holds more)

_PIECES = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
                        r"""[^\s\p{L}\p{N}]+""", regex.IGNORECASE)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's fixed table from bytes to printable characters (so a vocabulary is plain text)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@dataclass(frozen=True)
class ClipVocabulary:
    merges: tuple[tuple[str, str], ...]
    tokens: tuple[str, ...]  # id -> token

    @functools.cached_property
    def ranks(self) -> dict[tuple[str, str], int]:
        return {pair: i for i, pair in enumerate(self.merges)}

    @functools.cached_property
    def ids(self) -> dict[str, int]:
        return {token: i for i, token in enumerate(self.tokens)}


@functools.cache
def vocabulary() -> ClipVocabulary:
    lines = gzip.decompress(VOCAB_PATH.read_bytes()).decode("utf-8").split("\n")
    merges = tuple(tuple(line.split()) for line in lines[1 : _MERGES + 1])
    chars = list(_bytes_to_unicode().values())
    tokens = (*chars, *(c + "</w>" for c in chars), *("".join(pair) for pair in merges), START, END)
    return ClipVocabulary(merges, tokens)  # type: ignore[arg-type]


_BYTES = _bytes_to_unicode()


@functools.lru_cache(maxsize=20_000)
def _bpe(piece: str) -> tuple[str, ...]:
    """One pre-tokenized piece (already mapped to printable characters) as BPE tokens."""
    ranks = vocabulary().ranks
    word = (*piece[:-1], piece[-1] + "</w>")
    while len(word) > 1:
        pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
        best = min(pairs, key=lambda pair: ranks.get(pair, len(ranks)))
        if best not in ranks:
            break
        merged, i = [], 0
        while i < len(word):
            if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                merged.append(word[i] + word[i + 1])
                i += 2
            else:
                merged.append(word[i])
                i += 1
        word = tuple(merged)
    return word


def _clean(text: str) -> str:
    return " ".join(html.unescape(html.unescape(text)).split()).lower()


def tokenize(text: str, added: Iterable[str] = ()) -> list[str]:
    """``text`` as CLIP's tokens, without start and end; each of ``added`` (tokens a training added to
    the tokenizer, e.g. ``<subj>``) is one token, as in the pipeline's tokenizer."""
    text = _clean(text)
    specials = sorted({a.lower() for a in added if a}, key=len, reverse=True)
    out: list[str] = []
    for part in _split_on(text, specials):
        if part in specials:
            out.append(part)
            continue
        for piece in _PIECES.findall(part):
            out.extend(_bpe("".join(_BYTES[b] for b in piece.encode("utf-8"))))
    return out


def _split_on(text: str, specials: Sequence[str]) -> list[str]:
    parts = [text]
    for special in specials:
        split: list[str] = []
        for part in parts:
            if part in specials:
                split.append(part)
                continue
            chunks = part.split(special)
            for i, chunk in enumerate(chunks):
                if i:
                    split.append(special)
                if chunk.strip():
                    split.append(chunk)
        parts = split
    return parts


def encode(text: str) -> list[int]:
    """Token ids with start and end, as CLIP's tokenizer returns them (no padding, no truncation)."""
    ids = vocabulary().ids
    return [ids[START], *(ids[t] for t in tokenize(text)), ids[END]]


def token_count(text: str, added: Iterable[str] = ()) -> int:
    """Positions ``text`` takes in the text encoder, start and end tokens included."""
    return len(tokenize(text, added)) + 2


def fits(text: str, added: Iterable[str] = ()) -> bool:
    return token_count(text, added) <= CONTEXT_LENGTH
