"""Imports go downward only: the layers and models never reach the engine, processing never reaches the models, the
server never reaches into the engine (it speaks the typed contract: omni, requests, events, errors)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "thinktalk"
# package part -> the parts it must not import
FORBIDDEN = {
    "layers": ("engine", "models", "processing", "serve", "omni", "quant", "replies", "cli"),
    "models": ("engine", "processing", "serve", "omni", "quant", "replies", "cli"),
    "processing": ("models", "engine", "serve", "omni", "quant", "replies", "cli"),
    "quant": ("engine", "processing", "serve", "omni", "replies", "cli"),
    "engine": ("serve", "omni", "replies", "cli"),
    "serve": ("engine",),
    "errors": ("*",), "events": ("engine", "serve", "omni", "models"), "requests": ("engine", "serve", "omni"),
}


def internal_imports(path: Path) -> set[str]:
    """The thinktalk parts (first component below the package) `path` imports, relative or absolute."""
    module = path.relative_to(PACKAGE.parent).with_suffix("").parts  # ("thinktalk", "engine", "scheduler")
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(module[:len(module) - node.level])
                target = base + (node.module.split(".") if node.module else [])
                if not node.module:  # from . import x
                    target += [alias.name for alias in node.names][:1]
            else:
                target = (node.module or "").split(".")
            if target[:1] == ["thinktalk"] and len(target) > 1:
                found.add(target[1])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "thinktalk" and len(parts) > 1:
                    found.add(parts[1])
    return found


def test_every_module_imports_downward_only():
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        part = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        banned = FORBIDDEN.get(part, ())
        for target in internal_imports(path) - {part}:
            if "*" in banned or target in banned:
                problems.append(f"{path.relative_to(PACKAGE)} imports thinktalk.{target}")
    assert not problems, "\n".join(problems)


def test_the_walker_sees_relative_and_absolute_imports(tmp_path):
    assert internal_imports(PACKAGE / "engine" / "scheduler.py") >= {"config", "models", "errors"}
    assert "omni" in internal_imports(PACKAGE / "serve" / "app.py")
