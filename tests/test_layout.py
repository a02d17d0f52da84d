"""Issue #25: the package layout is the architecture. Reads every module of ast_cli with the stdlib's ``ast``
(nothing is imported) and holds the code to the layering written in ast_cli/__init__.py's docstring."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "ast_cli"
# Lowest first: a module may import from its own layer and the layers before it, never after.
LAYERS = ["", "audio", "checkpoint", "run", "tasks", "cli"]
BASE_MODULES = {"__init__", "__main__", "constants", "errors"}  # the loose modules of layer "" (at most 6 + 2)
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 60


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def layer_of(module: str) -> int:
    """Layer index of a dotted module name inside ast_cli ("" for ast_cli itself and its loose modules)."""
    parts = module.split(".")[1:]
    if parts == ["__main__"]:  # `python -m ast_cli` runs the cli: it sits on top
        return LAYERS.index("cli")
    top = parts[0] if parts and (PACKAGE / parts[0]).is_dir() else ""
    return LAYERS.index(top)


def module_name(path: Path) -> str:
    parts = ("ast_cli", *path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, source: str | None = None) -> list[tuple[int, str]]:
    """(line, absolute module) for every import of ast_cli code in the file, at any depth (lazy ones too)."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text("utf-8") if source is None else source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "ast_cli"]
        elif isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")[: len(package.split(".")) - node.level + 1]
            stem = ".".join(base + ([node.module] if node.module else []))
            # `from .. import hub` imports the module ast_cli.hub when there is one, else a name of the package
            found += [(node.lineno, f"{stem}.{a.name}" if _is_module(f"{stem}.{a.name}") else stem)
                      for a in node.names]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "ast_cli":
            found.append((node.lineno, node.module))
    return found


def _is_module(name: str) -> bool:
    path = PACKAGE.joinpath(*name.split(".")[1:])
    return path.with_suffix(".py").is_file() or path.is_dir()


def upward_imports(path: Path, source: str | None = None) -> list[str]:
    return [f"{path.relative_to(PACKAGE)}:{line} imports {target}"
            for line, target in imported_modules(path, source) if layer_of(target) > layer_of(module_name(path))]


def test_25_no_upward_import():
    assert [line for path in modules() for line in upward_imports(path)] == []


@pytest.mark.parametrize("source", ["def f():\n    from ..cli import _errors\n", "from ..tasks import listen\n",
                                    "import ast_cli.cli\n", "from ast_cli.tasks.train import Trainer\n"])
def test_25_the_checker_sees_an_upward_import(source):
    # The test above must be able to fail: lazy, relative and absolute imports all count.
    assert upward_imports(PACKAGE / "run" / "options.py", source)
    assert not upward_imports(PACKAGE / "cli" / "_app.py", source)


def test_25_few_loose_modules_and_layer_packages():
    loose = {p.stem for p in PACKAGE.glob("*.py")}
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert loose <= BASE_MODULES and len(loose - {"__init__", "__main__"}) <= 6
    assert packages == set(LAYERS[1:])


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_25_module_and_function_size(path):
    rel = path.relative_to(PACKAGE).as_posix()
    lines = path.read_text("utf-8").count("\n")
    assert lines <= MAX_MODULE_LINES, f"{rel} has {lines} lines"
    long = [f"{node.name} ({length} lines)" for node in ast.walk(ast.parse(path.read_text("utf-8")))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and (length := _body_lines(node)) > MAX_FUNCTION_LINES]
    assert long == [], rel


def _body_lines(function: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines from the first statement after the docstring to the end: a Typer command declares its options in
    the signature, one per line, and those are declarations, not logic."""
    body = function.body
    if len(body) > 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    return function.end_lineno - body[0].lineno + 1


# -- one load path -----------------------------------------------------------------------------------


def test_25_run_options_are_checked_once_when_built():
    from ast_cli.errors import UsageError
    from ast_cli.run.options import RunOptions

    with pytest.raises(UsageError) as caught:
        RunOptions(batch_size=0)
    assert caught.value.option == "batch_size"
    with pytest.raises(UsageError):
        RunOptions(fast=True, dtype="bf16")
    import dataclasses

    with pytest.raises(UsageError):  # a changed copy is checked too
        dataclasses.replace(RunOptions(), hop_seconds=0.001)

