"""Explicit registries: models, scores, methods, benchmarks and recipes are literal tables (no registration by import
side effect), and the package has one set of image suffixes."""

from __future__ import annotations

import ast
import subprocess
import sys
from importlib import resources
from pathlib import Path

import densehybrid

SRC = Path(densehybrid.__file__).parent


def _modules() -> list[tuple[Path, ast.Module]]:
    return [(path, ast.parse(path.read_text(encoding="utf-8"))) for path in sorted(SRC.rglob("*.py"))]


def test_no_module_registers_anything_when_imported():
    for path, tree in _modules():
        text = path.read_text(encoding="utf-8")
        assert "noqa: E402,F401" not in text and "(registers" not in text, path
        for node in tree.body:  # module-level statements only
            call = node.value if isinstance(node, ast.Expr) else None
            if isinstance(call, ast.Call):
                name = getattr(call.func, "id", getattr(call.func, "attr", ""))
                assert not name.startswith("register"), f"{path}:{node.lineno} calls {name} on import"


def test_the_tables_list_everything_the_package_ships():
    from densehybrid.data.datasets import BENCHMARKS
    from densehybrid.models.registry import MODELS
    from densehybrid.recipes import RECIPES, load_recipe
    from densehybrid.recipes.methods import METHODS
    from densehybrid.scores import SCORES

    presets = resources.files("densehybrid.recipes") / "presets"
    assert sorted(RECIPES) == sorted(p.name[: -len(".toml")] for p in presets.iterdir() if p.name.endswith(".toml"))
    assert sorted(METHODS) == ["closed-set", "denseflow-pretrain", "densehybrid", "dicnet"]
    assert {load_recipe(name)["method"] for name in RECIPES} == set(METHODS)
    assert "ladder_mobilenetv3" in MODELS and "densehybrid" in SCORES and "streethazards" in BENCHMARKS


def test_the_method_table_imports_no_method_code():
    code = (
        "import sys, densehybrid.recipes as r; assert len(r.METHODS) == 4; "
        "print('densehybrid.recipes.flow_methods' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_one_set_of_image_suffixes():
    defined = []
    for path, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.Tuple) and any(
                isinstance(e, ast.Constant) and e.value in (".jpg", ".jpeg") for e in node.elts
            ):
                defined.append(path.relative_to(SRC).as_posix())
    assert defined == ["data/datasets/_io.py"]
