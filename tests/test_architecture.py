"""The house, one way up: plugins -> toolkit, engine -> toolkit, and the engine names no method.

    methods/, examples/      plugins: import only harness.adapters
    harness/adapters/        the toolkit: imports nothing of the engine
    harness/ (the rest)      the engine: config -> study -> budget -> train -> evaluate
                             -> results -> tables / figures; bench; cli

Checked here: no import circles and no forbidden arrow (``scripts/check_imports.sh``, which
CI runs too); no built-in method's name in the engine's code (comments and docstrings
aside); plugins written against the old import paths still work, with a warning that names
the new one.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_no_import_circles_and_no_arrow_from_a_plugin_or_the_toolkit_into_the_engine():
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "check_imports.sh")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith("0 problem(s)")
    # the forbid list covers every engine module (so a new engine module is covered too)
    script = (ROOT / "scripts" / "check_imports.sh").read_text()
    assert "for path in harness/*.py harness/*/" in script


def _code_strings_and_names(path: Path) -> list[tuple[int, str]]:
    """String constants and identifiers of a module's code: docstrings and comments left out."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docstrings.add(id(body[0].value))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            out.append((node.lineno, node.value))
        elif isinstance(node, ast.Name):
            out.append((node.lineno, node.id))
        elif isinstance(node, ast.Attribute):
            out.append((node.lineno, node.attr))
    return out


def _snakemake_code(path: Path) -> list[tuple[int, str]]:
    """Code lines of a Snakemake file: comments and triple-quoted docstrings left out."""
    lines = []
    in_doc = False
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        quotes = line.count('"""')
        if in_doc or quotes:
            in_doc = in_doc != (quotes % 2 == 1)
            continue
        lines.append((number, line.split("#", 1)[0]))
    return lines


def test_the_engine_names_no_method():
    from methods import METHODS

    names = sorted(METHODS)
    word = re.compile(r"(?<![\w-])(" + "|".join(names) + r")(?![\w-])")
    engine = [
        p for p in (ROOT / "harness").rglob("*.py")
        if "adapters" not in p.parts and p.parent.name != "methods"  # toolkit; deprecated aliases
    ]
    found = []
    for path in engine:
        for line, text in _code_strings_and_names(path):
            if word.search(text):
                found.append(f"{path.relative_to(ROOT)}:{line}: {text!r}")
    for path in [ROOT / "Snakefile", *(ROOT / "workflow" / "rules").glob("*.smk")]:
        for line, text in _snakemake_code(path):
            if word.search(text):
                found.append(f"{path.relative_to(ROOT)}:{line}: {text.strip()!r}")
    assert not found, "method names in the engine:\n" + "\n".join(found)


def test_the_toolkit_names_no_method_either():
    from methods import METHODS

    word = re.compile(r"(?<![\w-])(" + "|".join(sorted(METHODS)) + r")(?![\w-])")
    found = [
        f"{p.relative_to(ROOT)}:{line}: {text!r}"
        for p in (ROOT / "harness" / "adapters").rglob("*.py")
        for line, text in _code_strings_and_names(p)
        if word.search(text)
    ]
    assert not found, "\n".join(found)
