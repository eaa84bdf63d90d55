"""A base tokenizer with a subject's new tokens added, made once per (tokenizer, tokens).

Adding tokens changes a tokenizer in place, so training and every adapter attach work on a copy and the
base's own tokenizer never changes. Every job of a worker asks for the same few such tokenizers (the
instance and background tokens have fixed names: ``<subj>``, the photos' ``<bgN>``), so each is kept while
its base tokenizer lives and handed out again; nothing adds to a tokenizer handed out here.
"""

from __future__ import annotations

import copy
import threading
import weakref
from collections.abc import Sequence
from typing import Any

from pipelines.errors import InvalidConfig

#: copies kept per base tokenizer (the least recently asked for goes first)
KEPT_PER_BASE = 4

_copies: weakref.WeakKeyDictionary[Any, dict[tuple[str, ...], tuple[Any, list[int]]]] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def with_added_tokens(tokenizer: Any, tokens: Sequence[str]) -> tuple[Any, list[int]]:  # noqa: ANN401
    """``(a tokenizer with tokens added, their ids)``; ``tokenizer`` itself is never changed.

    Raises :class:`InvalidConfig` when a token is already in its vocabulary."""
    key = tuple(tokens)
    with _lock:
        kept = _copies.setdefault(tokenizer, {})
        if key in kept:
            kept[key] = kept.pop(key)  # the most recently asked for goes last
            return kept[key]
    vocabulary = tokenizer.get_vocab()
    clashes = [t for t in key if t in vocabulary]
    if clashes:
        raise InvalidConfig(f"tokens already in the vocabulary: {clashes}; pick other token names",
                            {"tokens": clashes})
    added = copy.deepcopy(tokenizer)
    added.add_tokens(list(key))
    made = (added, added.convert_tokens_to_ids(list(key)))
    with _lock:
        kept = _copies.setdefault(tokenizer, {})
        kept[key] = made
        while len(kept) > KEPT_PER_BASE:
            kept.pop(next(iter(kept)))
    return made

