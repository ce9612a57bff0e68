"""Prompt template sets, by name, for building the open-vocabulary classifier.

Each template holds one `{}` that the class name fills. SAN embeds every (template, class) prompt with
CLIP's text tower and averages over templates (DESIGN.md §1); its released models use "vild".
"""

from __future__ import annotations

from typing import Dict, Tuple

# The 14 ViLD prompts, in the order the official SAN code lists them (san/model/clip_utils/utils.py,
# PREDEFINED_TEMPLATES["vild"]). Order matters only for bit-exact intermediate arrays, but keep it.
VILD_TEMPLATES: Tuple[str, ...] = (
    "a photo of a {}.",
    "This is a photo of a {}",
    "There is a {} in the scene",
    "There is the {} in the scene",
    "a photo of a {} in the scene",
    "a photo of a small {}.",
    "a photo of a medium {}.",
    "a photo of a large {}.",
    "This is a photo of a small {}.",
    "This is a photo of a medium {}.",
    "This is a photo of a large {}.",
    "There is a small {} in the scene.",
    "There is a medium {} in the scene.",
    "There is a large {} in the scene.",
)

# One prompt: cheap classifiers for quick experiments and tests.
SIMPLE_TEMPLATES: Tuple[str, ...] = ("a photo of a {}.",)

TEMPLATE_SETS: Dict[str, Tuple[str, ...]] = {
    "vild": VILD_TEMPLATES,
    "simple": SIMPLE_TEMPLATES,
}


def get_templates(name: str) -> Tuple[str, ...]:
  """The template set called `name` ("vild" or "simple")."""
  try:
    return TEMPLATE_SETS[name]
  except KeyError:
    raise KeyError(f"unknown template set {name!r}; known: {sorted(TEMPLATE_SETS)}") from None
