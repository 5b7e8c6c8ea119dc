"""The documentation's code blocks work when copied: every TOML block of README.md and docs/ is a valid recipe."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from densehybrid.recipes import load_recipe

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)


def fenced_blocks(path: Path, language: str) -> list[str]:
    """The bodies of the fenced code blocks of ``path`` marked ``language``, in document order."""
    return [body for lang, body in _FENCE.findall(path.read_text(encoding="utf-8")) if lang == language]


TOML_BLOCKS = [
    pytest.param(block, id=f"{path.name}-{i}")
    for path in DOCUMENTS
    for i, block in enumerate(fenced_blocks(path, "toml"))
]


def test_the_docs_hold_toml_blocks():
    assert TOML_BLOCKS, "no ```toml block found: the pattern or the docs changed"


@pytest.mark.parametrize("block", TOML_BLOCKS)
def test_every_toml_block_is_a_recipe_the_loader_accepts(block, tmp_path):
    path = tmp_path / "recipe.toml"
    path.write_text(block, encoding="utf-8")
    recipe = load_recipe(path)
    assert recipe["method"] and recipe["model"]["name"]
