"""Vocabulary -> class text embeddings, computed once per vocabulary and cached.

The text tower is frozen, so a vocabulary's class embeddings ([C, E]: per template L2-normalised,
averaged over the templates, renormalised) never change; the model appends the trainable background row
and applies the logit scale in its forward. Classes are embedded in fixed-size chunks, padded, so one
compiled function serves vocabularies of any size (1 to thousands of classes) without recompiling.
"""

from __future__ import annotations

import logging
from typing import Dict, Sequence, Set, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from san_jax.ops import resize
from san_jax.text import templates as templates_lib
from san_jax.text import tokenizer as tokenizer_lib


log = logging.getLogger("san_jax.text")

# Class names already warned about as too long for the text tower's context (warned once per process).
_WARNED_LONG: Set[Tuple[str, int]] = set()


class VocabularyError(ValueError):
  """A vocabulary that cannot be prompted: empty, blank or duplicated class names, or names whose prompts
  are identical once tokenised and cut to the text tower's context length."""


def check_prompt_tokens(names: Sequence[str], tokens: np.ndarray, templates: Sequence[str]) -> None:
  """Refuses two classes whose prompts are the same token ids under every template ([T, C, L] `tokens`:
  names that differ only after the context-length cut, or in what the tokenizer cleans away), naming both;
  warns once per name about a name whose prompts are cut (their end is lost)."""
  context = tokens.shape[-1]
  seen: Dict[bytes, int] = {}
  dups = []
  for c, name in enumerate(names):
    key = np.ascontiguousarray(tokens[:, c]).tobytes()
    if key in seen:
      dups.append(f"{names[seen[key]]!r} and {name!r} (positions {seen[key]} and {c})")
    else:
      seen[key] = c
  if dups:
    raise VocabularyError(f"class names whose prompts are identical after tokenisation (the text tower reads "
                          f"{context} tokens): " + ", ".join(dups) + "; they would get the same embedding. "
                          "Rename or shorten them so they differ within the first tokens.")
  full = np.nonzero((tokens[..., -1] != 0).any(axis=0))[0]  # a row without padding may have been cut
  for c in full:
    name = names[int(c)]
    if (name, context) in _WARNED_LONG:
      continue
    longest = max(len(tokenizer_lib.default_tokenizer().encode(t.format(name))) + 2 for t in templates)
    if longest > context:
      _WARNED_LONG.add((name, context))
      log.warning("class name %r is too long: its longest prompt has %d tokens, the text tower reads %d; the end "
                  "is cut off", name, longest, context)


def validate_vocabulary(vocabulary: Sequence[str]) -> Tuple[str, ...]:
  """Strips names and rejects empty vocabularies, blank names and duplicates (naming them)."""
  if isinstance(vocabulary, str):
    raise VocabularyError("vocabulary must be a sequence of class names, not one string "
                          "(split it, e.g. san_jax.text.classifier.parse_vocabulary)")
  names = [str(v).strip() for v in vocabulary]
  if not names:
    raise VocabularyError("the vocabulary is empty: give at least one class name")
  blank = [i for i, n in enumerate(names) if not n]
  if blank:
    raise VocabularyError(f"blank class names at positions {blank}")
  seen: Dict[str, int] = {}
  dups = []
  for i, n in enumerate(names):
    key = " ".join(n.lower().split())  # the tokenizer lowercases and collapses whitespace: same prompt
    if key in seen:
      dups.append(f"{names[seen[key]]!r} and {n!r} (positions {seen[key]} and {i})")
    else:
      seen[key] = i
  if dups:
    raise VocabularyError("duplicate class names (they would give identical prompts): " + ", ".join(dups))
  return tuple(names)


def prompt_tokens(names: Sequence[str], templates: Sequence[str],
                  context_length: int = tokenizer_lib.DEFAULT_CONTEXT_LENGTH) -> np.ndarray:
  """[T, C, L] token ids: every template filled with every class name (the one place prompts are tokenised:
  the classifier, the parity checker, the memory benchmark and the demo's CLIP pretraining)."""
  return np.stack([tokenizer_lib.tokenize([t.format(n) for n in names], context_length) for t in templates])


def check_vocabulary_prompts(vocabulary: Sequence[str], template_set: str = "vild",
                             context_length: int = 77) -> Tuple[str, ...]:
  """`validate_vocabulary` plus the token-level checks of `check_prompt_tokens`, without a model: for
  entry points that want to refuse a vocabulary before loading anything. Returns the stripped names."""
  names = validate_vocabulary(vocabulary)
  templates = templates_lib.get_templates(template_set)
  check_prompt_tokens(names, prompt_tokens(names, templates, context_length), templates)
  return names


def parse_vocabulary(text: str) -> Tuple[str, ...]:
  """"cat, dog; grass" or one name per line -> ("cat", "dog", "grass"). Commas inside a name are not
  supported here: use a vocabulary file with one class per line for names like "road, route"."""
  if "\n" in text.strip():
    parts = text.splitlines()
  else:
    parts = text.replace(";", ",").split(",")
  return validate_vocabulary([p for p in parts if p.strip()])


def read_vocabulary_file(path: str) -> Tuple[str, ...]:
  """One class per line; blank lines and lines starting with '#' are skipped."""
  with open(path, encoding="utf-8") as f:
    lines = [ln.strip() for ln in f]
  return validate_vocabulary([ln for ln in lines if ln and not ln.startswith("#")])


def _gathered(state: nnx.State) -> nnx.State:
  """Leaves split over a mesh (fsdp) -> replicated on it, so each device encodes the text with whole
  weights: a matmul over split weights would add partial sums with an all-reduce whose order depends on
  the process layout, and the class embeddings (hence every loss) would differ in the last bits between
  1 x 8 and 4 x 2 devices (measured: loss_ce at step 1 of a 4-process fsdp=2 run). One program for all
  of them (a jitted identity: it also reshards arrays that span several processes)."""
  leaves, treedef = jax.tree.flatten(state)
  split = [i for i, x in enumerate(leaves)
           if isinstance(getattr(x, "sharding", None), jax.sharding.NamedSharding)
           and any(a is not None for a in x.sharding.spec)]
  if split:
    whole = [jax.sharding.NamedSharding(leaves[i].sharding.mesh, jax.sharding.PartitionSpec()) for i in split]
    for i, x in zip(split, jax.jit(lambda xs: xs, out_shardings=whole)([leaves[i] for i in split])):
      leaves[i] = x
  return jax.tree.unflatten(treedef, leaves)


class ClassEmbeddingCache:
  """vocabulary -> class embeddings [C, E] (jax array), cached per (vocabulary, template set).

  `text_head` is an NNX module with `class_embeddings(tokens [T, C, L]) -> [C, E]` (SAN's
  `ov_classifier`); its parameters are passed to the jitted function as arguments (not baked in as
  constants), and it is called on fixed-size chunks of classes.
  """

  def __init__(self, text_head: nnx.Module, template_set: str = "vild", chunk: int = 32,
               context_length: int = 77):
    graphdef, state = nnx.split(text_head)
    state = _gathered(state)
    embed = jax.jit(lambda st, tokens: nnx.merge(graphdef, st).class_embeddings(tokens))
    self._embed = lambda tokens: embed(state, tokens)
    self.templates = templates_lib.get_templates(template_set)
    self.chunk = chunk
    self.context_length = context_length
    self._cache: Dict[Tuple[str, ...], jax.Array] = {}

  def tokens(self, names: Sequence[str]) -> np.ndarray:
    """[T, C, L] token ids: every template filled with every class name."""
    return prompt_tokens(names, self.templates, self.context_length)

  def __call__(self, vocabulary: Sequence[str]) -> jax.Array:
    names = validate_vocabulary(vocabulary)
    if names not in self._cache:
      tokens = self.tokens(names)
      check_prompt_tokens(names, tokens, self.templates)
      c = len(names)
      padded = resize.round_up(c, self.chunk)
      if padded > c:  # pad with copies of the first class: cheap, and sliced away below
        tokens = np.concatenate([tokens, np.repeat(tokens[:, :1], padded - c, axis=1)], axis=1)
      parts = [self._embed(jnp.asarray(tokens[:, i:i + self.chunk])) for i in range(0, padded, self.chunk)]
      self._cache[names] = jnp.concatenate(parts, axis=0)[:c]
    return self._cache[names]
