"""The tree's structure: one training loop, and short functions in the training machinery and the demo."""

from __future__ import annotations

import ast
from pathlib import Path

import densehybrid

SOURCE = Path(densehybrid.__file__).parent
#: Functions allowed to call ``.backward()`` and step an optimiser besides fit's own step: the two halves of the
#: released joint flow iteration (run inside fit by JointFlowObjective) and the 2-D toy's own small models.
ALLOWED = {
    ("engine/train.py", "_Loop.step"),
    ("engine/flow_joint.py", "segmenter_step"),
    ("engine/flow_joint.py", "flow_step"),
}
MAX_LINES = 120


def _functions(path: Path):
    """(qualified name, node) of every function and method in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield f"{prefix}{child.name}", child
                yield from visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                yield from visit(child, f"{prefix}{child.name}.")
            else:
                yield from visit(child, prefix)

    yield from visit(tree, "")


def _trains(function: ast.AST) -> bool:
    """Whether ``function`` calls ``.backward()`` and ``.step(...)`` on an optimiser (or a grad scaler)."""
    backward = step = False
    for node in ast.walk(function):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            receiver = ast.unparse(node.func.value).lower()
            backward |= node.func.attr == "backward"
            step |= node.func.attr == "step" and ("optim" in receiver or "scaler" in receiver)
    return backward and step


def test_only_fit_runs_a_training_loop():
    training = {
        (path.relative_to(SOURCE).as_posix(), name)
        for path in sorted(SOURCE.rglob("*.py"))
        for name, node in _functions(path)
        if _trains(node)
    }
    toy = {item for item in training if item[0] == "toy2d.py"}
    assert ("engine/train.py", "_Loop.step") in training  # fit's step
    assert training - toy <= ALLOWED, sorted(training - toy - ALLOWED)


def test_the_check_sees_a_training_loop():
    loop = ast.parse("def train(model, optimizer):\n    loss = model()\n    loss.backward()\n    optimizer.step()\n")
    assert _trains(loop.body[0])
    assert not _trains(ast.parse("def f(scheduler):\n    scheduler.step()\n").body[0])


def test_no_function_of_the_training_machinery_or_the_demo_is_longer_than_120_lines():
    paths = [
        *sorted((SOURCE / "engine").rglob("*.py")),
        *sorted((SOURCE / "recipes").rglob("*.py")),
        SOURCE / "demo.py",
    ]
    long = [
        f"{path.relative_to(SOURCE).as_posix()}:{name} ({node.end_lineno - node.lineno + 1} lines)"
        for path in paths
        for name, node in _functions(path)
        if node.end_lineno - node.lineno + 1 > MAX_LINES
    ]
    assert not long
