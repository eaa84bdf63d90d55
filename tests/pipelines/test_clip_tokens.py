"""Prompts fit CLIP's 77-token window, counted with CLIP's real vocabulary.

The text encoder of every CLIP and SD 1.x model reads 77 tokens and drops the rest without a word;
a style pack that ran over would lose its last words, so every shipped prompt is counted here, with
the subject's tokens filled in as at generation and training. The ``tiny`` preset's tokenizer is the
same vocabulary: it counts what CLIP counts and never warns about a prompt that fits.
"""

from __future__ import annotations

import hashlib
import logging

import pytest

from likeness.contract.requests import (
    GenerateRequest,
    RequestRejected,
    TemplateRequest,
    resolve_generation,
    resolve_templating,
)
from pipelines.generation.styles import fill_prompt, list_styles
from pipelines.intake.captions import background_tokens
from pipelines.templates.catalog import list_templates
from pipelines.templates.spec import DEFAULT_NEGATIVE_PROMPT
from pipelines.text import clip_bpe
from pipelines.text.subject import CLASS_CANDIDATES, INSTANCE_TOKEN

SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"  # open_clip 3.3.0's copy


def test_the_vocabulary_is_clips_own():
    assert hashlib.sha256(clip_bpe.VOCAB_PATH.read_bytes()).hexdigest() == SHA256
    assert len(clip_bpe.vocabulary().tokens) == 49408
    # ids as CLIP ViT-L/14's tokenizer gives them
    assert clip_bpe.encode("a photo of a cat") == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert clip_bpe.tokenize("Studio headshot, 85mm") == ["studio</w>", "headshot</w>", ",</w>", "8</w>", "5</w>",
                                                         "mm</w>"]
    assert clip_bpe.tokenize("photo of <subj> girl", added=["<subj>"]) == ["photo</w>", "of</w>", "<subj>", "girl</w>"]


def _style_prompts() -> list[tuple[str, str]]:
    """(what, text) for every prompt a shipped pack or template sends to the text encoder."""
    out = []
    for style in list_styles():
        for template in style.prompts:
            out += [(f"{style.name} prompt", fill_prompt(template, INSTANCE_TOKEN, word)) for word in CLASS_CANDIDATES]
        out.append((f"{style.name} negative", style.negative_prompt))
    for template in list_templates():
        out += [(f"template {template.name}", fill_prompt(f"{{instance}} {{class}}, {template.caption}",
                                                          INSTANCE_TOKEN, word)) for word in CLASS_CANDIDATES]
    out.append(("template negative", DEFAULT_NEGATIVE_PROMPT))
    # training captions: a background token, the instance token, the class word
    out += [("training caption", f"{bg} {INSTANCE_TOKEN} {word}") for bg in background_tokens(30)
            for word in CLASS_CANDIDATES]
    return out


ADDED = (INSTANCE_TOKEN, *background_tokens(30))


def test_every_shipped_prompt_fits_clips_window():
    counts = {what: clip_bpe.token_count(text, ADDED) for what, text in _style_prompts()}
    too_long = {what: n for what, n in counts.items() if n > clip_bpe.CONTEXT_LENGTH}
    assert not too_long
    assert len(list_styles()) >= 15 and max(counts.values()) > 30  # the count is real, not one per prompt


def test_every_shipped_style_and_template_passes_the_apis_check():
    for style in list_styles():
        resolve_generation(GenerateRequest(style=style.name))
    for template in list_templates():
        resolve_templating(TemplateRequest(template=template.name))


def test_a_prompt_that_would_be_cut_is_refused_with_its_count():
    fits = "a portrait of {instance} {class}, " + ", ".join(["soft light"] * 23) + " film"  # 6 + 23*3 - 1 + 1 + 2
    resolve_generation(GenerateRequest(prompts=[fits]))
    with pytest.raises(RequestRejected) as refused:
        resolve_generation(GenerateRequest(prompts=[fits + ", film"]))
    assert refused.value.code == "prompt_too_long_for_clip"
    assert refused.value.details["tokens"] == 79 and refused.value.details["limit"] == 77
    with pytest.raises(RequestRejected) as negative:
        resolve_generation(GenerateRequest(style="cinematic", negative_prompt="blurry, " * 40))
    assert negative.value.code == "prompt_too_long_for_clip" and negative.value.details["field"] == "negative_prompt"
    with pytest.raises(RequestRejected) as caption:
        resolve_templating(TemplateRequest(template="astronaut", caption="1, " * 40))
    assert caption.value.code == "prompt_too_long_for_clip" and caption.value.details["field"] == "caption"


def test_the_tiny_tokenizer_counts_as_clip_and_never_warns_about_a_prompt_that_fits(tiny_preset, caplog):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_preset.base_model, subfolder="tokenizer")
    tokenizer.add_tokens(list(ADDED))
    with caplog.at_level(logging.WARNING):
        for what, text in _style_prompts():
            ids = tokenizer(text)["input_ids"]  # untruncated, as diffusers' check does
            assert len(ids) == clip_bpe.token_count(text, ADDED), what
    assert "longer than the specified maximum" not in caplog.text
    assert tokenizer("a photo of a cat")["input_ids"] == clip_bpe.encode("a photo of a cat")


def test_letters_and_numbers_split_as_clip_splits_them():
    """CLIP's pre-tokenizer splits on Unicode letter and number classes: a superscript two is a number,
    so ``x²`` is ``x`` then ``²`` (the standard library's ``re`` would keep them together)."""
    assert clip_bpe.tokenize("x²") == clip_bpe.tokenize("x") + clip_bpe.tokenize("²")
    assert clip_bpe.tokenize("café42") == clip_bpe.tokenize("café") + clip_bpe.tokenize("4") + clip_bpe.tokenize("2")
