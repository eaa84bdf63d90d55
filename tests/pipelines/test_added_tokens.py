"""A subject's tokens go on a copy of the base tokenizer, made once per (base tokenizer, tokens)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.errors import InvalidConfig
from pipelines.models.loading import local_tokenizers
from pipelines.text.added_tokens import with_added_tokens


@pytest.fixture
def base_tokenizer(tiny_preset):  # noqa: ANN001, ANN201
    return local_tokenizers(Path(tiny_preset.base_model))["tokenizer"]


def test_the_tokens_go_on_a_copy_that_later_jobs_get_again(base_tokenizer):
    before = base_tokenizer("a photo of <subj> girl <bg0>").input_ids
    size = len(base_tokenizer)

    added, ids = with_added_tokens(base_tokenizer, ["<subj>", "<bg0>"])

    assert ids == [size, size + 1] and len(added) == size + 2
    assert added("a photo of <subj> girl <bg0>").input_ids == [before[0], *before[1:4], size,
                                                              added("girl").input_ids[1], size + 1, before[-1]]
    assert len(base_tokenizer) == size and base_tokenizer("a photo of <subj> girl <bg0>").input_ids == before
    assert with_added_tokens(base_tokenizer, ["<subj>", "<bg0>"])[0] is added  # the next job's: not copied again
    other, other_ids = with_added_tokens(base_tokenizer, ["<subj>"])
    assert other is not added and other_ids == [size] and len(added) == size + 2


def test_a_token_the_vocabulary_has_is_refused(base_tokenizer):
    with pytest.raises(InvalidConfig, match="already in the vocabulary") as raised:
        with_added_tokens(base_tokenizer, ["<subj>", "face</w>"])
    assert raised.value.details == {"tokens": ["face</w>"]}


def test_each_load_of_a_local_base_gets_its_own_tokenizer(tiny_preset):
    first = local_tokenizers(Path(tiny_preset.base_model))["tokenizer"]
    second = local_tokenizers(Path(tiny_preset.base_model))["tokenizer"]
    first.add_tokens(["<only-here>"])  # what diffusers' load_textual_inversion does to a pipeline's tokenizer
    assert len(first) == len(second) + 1 and "<only-here>" not in second.get_vocab()
    assert local_tokenizers(Path("stable-diffusion-v1-5/stable-diffusion-v1-5")) == {}  # a hub id: diffusers reads it


def test_loads_of_one_base_share_the_tokenizers_with_tokens_unless_theirs_was_changed(tiny_preset):
    first = local_tokenizers(Path(tiny_preset.base_model))["tokenizer"]
    second = local_tokenizers(Path(tiny_preset.base_model))["tokenizer"]
    changed = local_tokenizers(Path(tiny_preset.base_model))["tokenizer"]
    changed.add_tokens(["<elsewhere>"])  # as diffusers' load_textual_inversion would

    added, ids = with_added_tokens(first, ["<subj>"])

    assert with_added_tokens(second, ["<subj>"]) == (added, ids)  # a base loaded again: not copied again
    own, own_ids = with_added_tokens(changed, ["<subj>"])
    assert own is not added and own_ids == [ids[0] + 1] and "<elsewhere>" in own.get_vocab()
    assert "<elsewhere>" not in added.get_vocab() and "<subj>" not in first.get_vocab()
