"""Vocabularies are validated on their tokens (issue 14, item 6): two class names whose prompts are the same
token ids once cut to the text tower's 77 tokens would get the same embedding, so they are refused naming
both; a name whose prompts are cut is warned about once, by name."""

from __future__ import annotations

import logging

import pytest
from flax import nnx

from configs import tiny
from san_jax.models import san as san_lib
from san_jax.text import classifier, templates, tokenizer

# 80 repetitions of a one-token word: longer than any prompt's 77 tokens, so what follows is cut off.
PREFIX = " ".join(["stripe"] * 80)


@pytest.fixture(scope="module")
def cache():
  cfg = san_lib.config_from_dict(tiny.get_config().model.to_dict())
  return classifier.ClassEmbeddingCache(san_lib.OVClassifier(cfg.clip, rngs=nnx.Rngs(0)), "vild")


def test_the_names_differ_only_after_the_context_length():
  # the premise, from the tokenizer alone: the shared prefix is past the 77-token window in every template
  assert len(tokenizer.default_tokenizer().encode(PREFIX)) == 80
  a = tokenizer.tokenize([t.format(PREFIX + " cat") for t in templates.VILD_TEMPLATES])
  b = tokenizer.tokenize([t.format(PREFIX + " dog") for t in templates.VILD_TEMPLATES])
  assert (a == b).all()


def test_names_identical_after_tokenisation_are_refused_naming_both(cache):
  with pytest.raises(classifier.VocabularyError) as info:
    cache(["grass", PREFIX + " cat", "sky", PREFIX + " dog"])
  msg = str(info.value)
  assert "identical after tokenisation" in msg and "77 tokens" in msg
  assert repr(PREFIX + " cat") in msg and repr(PREFIX + " dog") in msg and "positions 1 and 3" in msg


def test_an_over_long_name_is_warned_once_by_name_and_short_names_are_not(cache, caplog):
  long_a = "tangerine coloured " + PREFIX  # differs from long_b within the first tokens: accepted
  long_b = "aubergine coloured " + PREFIX
  caplog.set_level(logging.WARNING, logger="san_jax.text")
  emb = cache(["grass", long_a, long_b])
  assert emb.shape[0] == 3
  cache(["sky", long_a, long_b])  # another vocabulary with the same names: no second warning
  warned = [r.getMessage() for r in caplog.records if "too long" in r.getMessage()]
  assert len(warned) == 2, warned
  assert repr(long_a) in warned[0] + warned[1] and repr(long_b) in warned[0] + warned[1]
  assert all("the text tower reads 77" in w for w in warned)
  assert not any("'grass'" in w or "'sky'" in w for w in warned)


def test_the_check_runs_without_a_model():
  with pytest.raises(classifier.VocabularyError, match="identical after tokenisation"):
    classifier.check_vocabulary_prompts([PREFIX + " cat", PREFIX + " dog"])
  assert classifier.check_vocabulary_prompts([" cat", "dog"]) == ("cat", "dog")
