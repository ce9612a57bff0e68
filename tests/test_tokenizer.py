"""Tokenizer parity with open_clip, prompt templates, and SAN's vocabularies."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from san_jax.data import vocabularies
from san_jax.text import templates
from san_jax.text import tokenizer as tokenizer_lib

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"  # CI clones the repo next to shared/
TINY_CASE = SHARED / "reference" / "tiny_b16"


@pytest.fixture(scope="module")
def ours():
  return tokenizer_lib.default_tokenizer()


@pytest.fixture(scope="module")
def open_clip_tokenize():
  from tests.torch_refs import open_clip
  return open_clip().tokenize


def _assert_same_ids(ours, open_clip_tokenize, texts, context_length=77):
  got = ours(texts, context_length=context_length)
  want = open_clip_tokenize(list(texts), context_length=context_length).numpy()
  assert got.dtype == np.int32 and got.shape == (len(texts), context_length)
  bad = np.flatnonzero((got != want).any(axis=1))
  assert bad.size == 0, [(texts[i], got[i][:16].tolist(), want[i][:16].tolist()) for i in bad[:5]]


# Text that exercises each cleaning and pre-tokenization rule.
ODD_TEXTS = [
    "", " ", "\t\n ", "a", "A", "Hello, World!!", "what?!...", "(parenthesised) [bracketed] {braced}",
    "snake_case-and-kebab/slash\\back", "#hashtag @mention $5.99 100% ~tilde~ `tick`",
    "12345", "3.14159", "1e-9 0x1F 2,000,000", "route 66", "year2024abc",
    "it's", "IT'S", "we'll they'd you're I've I'm don't", "rock 'n' roll", "l'été",
    "café naïve Ångström façade jalapeño", "Straße", "ǅemal", "İstanbul", "ﬁnance ﬂoor",
    "日本語のテキスト", "中文分词测试", "한국어", "русский текст", "ελληνικά", "עברית", "العربية",
    "हिन्दी", "ไทย", "emoji 🎉👍🏽 ok", "👨‍👩‍👧‍👦 family", "🇯🇵 flag", "♥ ★ ☃", "∑ ∫ √ ∞",
    "&amp;", "&#39;", "&amp;amp;", "&lt;b&gt;bold&lt;/b&gt;", "Tom &amp; Jerry&#39;s", "&quot;quoted&quot;",
    "&nbsp;nbsp", "&#x1F600;", "&bogus;", "AT&T",
    "  leading and trailing  ", "many     inner\t\tspaces\n\nand lines", "nbsp\u00a0here", "zero\u200bwidth",
    "ideographic\u3000space", "ＦＵＬＬＷＩＤＴＨ ｔｅｘｔ", "mojibake: cafÃ©", "control\x07char", "sep\x1c\x1dchars",
    "<start_of_text>", "<end_of_text>", "a <START_OF_TEXT> b <end_of_text> c", "<|endoftext|>", "</w>",
    "antidisestablishmentarianism", "pneumonoultramicroscopicsilicovolcanoconiosis",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "abababababababababababab",
]

LONG_TEXTS = [
    " ".join(["word"] * 100),
    "x" * 500,
    "a photo of a " + ", ".join(vocabularies.ADE20K_847[:60]),
    "日本語" * 80,
    " ".join(str(i) for i in range(200)),
    " ".join(["word"] * 75),  # exactly 77 with start/end
    " ".join(["word"] * 76),  # one over: the last word is replaced by the end token
]


def _vocabulary_prompts():
  return [t.format(name) for vocab in vocabularies.VOCABULARIES.values() for name in vocab
          for t in templates.get_templates("vild")]


def test_matches_open_clip_on_all_vocabulary_prompts(ours, open_clip_tokenize):
  texts = _vocabulary_prompts()
  assert len(texts) == 14 * sum(len(v) for v in vocabularies.VOCABULARIES.values()) > 20_000
  _assert_same_ids(ours, open_clip_tokenize, texts)


def test_matches_open_clip_on_odd_text(ours, open_clip_tokenize):
  _assert_same_ids(ours, open_clip_tokenize, ODD_TEXTS)


def test_matches_open_clip_on_truncation(ours, open_clip_tokenize):
  _assert_same_ids(ours, open_clip_tokenize, LONG_TEXTS)
  ids = ours(LONG_TEXTS)
  assert (ids[:, -1] == ours.end_id).all() and (ids[:, 0] == ours.start_id).all()


@pytest.mark.parametrize("context_length", [1, 2, 5, 16, 100])
def test_matches_open_clip_at_other_context_lengths(ours, open_clip_tokenize, context_length):
  _assert_same_ids(ours, open_clip_tokenize, ODD_TEXTS[:20] + LONG_TEXTS[:2], context_length)


def test_layout(ours):
  ids = ours("a photo of a cat.")
  assert ids.shape == (1, 77) and ids.dtype == np.int32
  n = int((ids[0] != 0).sum())
  assert ids[0, 0] == 49406 and ids[0, n - 1] == 49407 and not ids[0, n:].any()
  assert ids[0, 1:n - 1].tolist() == ours.encode("a photo of a cat.")
  assert ours([]).shape == (0, 77)
  assert (ours(["x", "x"]) == ours("x")).all()


def test_module_level_tokenize_and_decode(ours):
  texts = ["There is a traffic light in the scene", "potted plant"]
  np.testing.assert_array_equal(tokenizer_lib.tokenize(texts), ours(texts))
  assert tokenizer_lib.tokenize(texts, context_length=8).shape == (2, 8)
  assert ours.decode(ours("A Photo of a Café.")[0]) == "a photo of a café ."


def test_golden_case_text_tokens(ours):
  """The golden case's prompts were tokenized by open_clip 2.16 (the version the official SAN pins)."""
  if not TINY_CASE.is_dir():
    pytest.skip(f"golden case not found: {TINY_CASE} (shared/ is expected next to the repository)")
  case = json.loads((TINY_CASE / "case.json").read_text())
  want = np.load(TINY_CASE / "inputs.npz")["text_tokens"]
  assert case["template_set"] == "vild"
  assert tuple(case["templates"]) == templates.get_templates("vild")
  got = np.stack([ours([t.format(c) for c in case["vocabulary"]]) for t in case["templates"]])
  assert want.shape == got.shape == (14, 6, 77)
  np.testing.assert_array_equal(got, want)


def test_bpe_path_argument_and_env_var(monkeypatch, tmp_path):
  path = tokenizer_lib.find_bpe_path()
  assert path.name == tokenizer_lib.BPE_FILENAME
  assert (tokenizer_lib.Tokenizer(bpe_path=path)("a cat") == tokenizer_lib.tokenize("a cat")).all()
  monkeypatch.setenv(tokenizer_lib.BPE_PATH_ENV, str(path))
  assert tokenizer_lib.find_bpe_path() == path
  monkeypatch.setenv(tokenizer_lib.BPE_PATH_ENV, str(tmp_path / "missing.txt.gz"))
  with pytest.raises(tokenizer_lib.BpeVocabNotFound, match=tokenizer_lib.BPE_PATH_ENV):
    tokenizer_lib.find_bpe_path()


def test_missing_vocabulary_error_says_how_to_install(monkeypatch):
  monkeypatch.delenv(tokenizer_lib.BPE_PATH_ENV, raising=False)
  monkeypatch.setattr(tokenizer_lib, "_installed_bpe_path", lambda: None)
  with pytest.raises(FileNotFoundError, match="pip install --no-deps open_clip_torch"):
    tokenizer_lib.Tokenizer()


def test_does_not_import_torch_or_open_clip():
  code = ("import sys; from san_jax.text import tokenizer as t; t.tokenize('a photo of a cat.'); "
          "bad = [m for m in ('torch', 'open_clip', 'torchvision') if m in sys.modules]; "
          "assert not bad, bad")
  env = {k: v for k, v in os.environ.items() if k != tokenizer_lib.BPE_PATH_ENV}
  subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, check=True)


def test_templates():
  vild = templates.get_templates("vild")
  assert len(vild) == 14 and len(set(vild)) == 14
  assert vild[0] == "a photo of a {}." and vild[-1] == "There is a large {} in the scene."
  assert all(t.count("{}") == 1 for t in vild)
  assert templates.get_templates("simple") == ("a photo of a {}.",)
  with pytest.raises(KeyError, match="vild"):
    templates.get_templates("imagenet80")


@pytest.mark.parametrize("name, size", [
    ("coco_stuff_171", 171), ("ade20k_150", 150), ("ade20k_847", 847), ("pcontext_59", 59),
    ("pcontext_459", 459), ("voc_20", 20), ("voc_21", 21)])
def test_vocabulary_sizes(name, size):
  vocab = vocabularies.get_vocabulary(name)
  assert len(vocab) == size
  assert len(set(vocab)) == size
  assert all(isinstance(c, str) and c and c == c.strip() for c in vocab)


def test_vocabulary_entries():
  """Spot checks against the source files' label ids, to catch an entry dropped or duplicated."""
  ade847 = vocabularies.get_vocabulary("ade20k_847")
  for i, name in {0: "wall", 13: "windowpane, window", 50: "bridge, span", 100: "buffet, counter, sideboard",
                  150: "blanket, cover", 200: "tapestry, tapis", 245: "banner, streamer", 300:
                  "altar, communion table, lord's table", 350: "shirt", 400: "meter", 450: "ticket counter",
                  500: "cat", 550: "throne", 600: "centerpiece", 650: "chess", 700: "plant pots",
                  750: "flip flop", 800: "dog dish", 846: "adding machine, totalizer, totaliser"}.items():
    assert ade847[i] == name, i
  ade150 = vocabularies.get_vocabulary("ade20k_150")
  assert (ade150[0], ade150[8], ade150[12], ade150[149]) == ("wall", "window", "person", "flag")
  coco = vocabularies.get_vocabulary("coco_stuff_171")
  assert (coco[0], coco[79], coco[80], coco[170]) == ("person", "toothbrush", "banner", "wood")
  pc459 = vocabularies.get_vocabulary("pcontext_459")
  assert list(pc459) == sorted(pc459)  # the source list is alphabetical
  assert vocabularies.get_vocabulary("pcontext_59")[-1] == "wood"
  assert vocabularies.get_vocabulary("voc_20")[-1] == "tv"
  assert vocabularies.get_vocabulary("voc_21") == ("background",) + vocabularies.get_vocabulary("voc_20")
  with pytest.raises(KeyError, match="ade20k_150"):
    vocabularies.get_vocabulary("ade")
