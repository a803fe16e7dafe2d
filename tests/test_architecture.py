"""The import rule: utils -> dataset, model, Loss -> inference -> optim -> entry scripts, tools.

Every module's imports are parsed (not executed); a module may import from its own package and
from packages of a lower level only, and the package graph has no cycle.
"""
import ast
import os
import re

import pytest

from tests.conftest import ROOT

LEVELS = {"utils": 0, "dataset": 1, "model": 1, "Loss": 1, "inference": 2, "optim": 3,
          "tools": 4, "train": 4, "eval": 4, "preprocess": 4}
PACKAGES = [name for name in LEVELS if os.path.isdir(os.path.join(ROOT, name))]


def project_modules():
    """(unit, path) for every project module; unit is its package or entry-script name."""
    found = []
    for name in LEVELS:
        if name in PACKAGES:
            for dirpath, _, files in os.walk(os.path.join(ROOT, name)):
                found += [(name, os.path.join(dirpath, f)) for f in files if f.endswith(".py")]
        else:
            found.append((name, os.path.join(ROOT, f"{name}.py")))
    return found


def imported_units(path):
    """The project units a module imports, anywhere in it (function-level imports too)."""
    units = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        units.update(n.split(".")[0] for n in names if n.split(".")[0] in LEVELS)
    return units


def violations(modules):
    wrong = []
    for unit, path in modules:
        for target in imported_units(path):
            if target != unit and LEVELS[target] >= LEVELS[unit]:
                wrong.append(f"{os.path.relpath(path, ROOT)} ({unit}, level {LEVELS[unit]}) "
                             f"imports {target} (level {LEVELS[target]})")
    return wrong


def test_every_import_flows_one_way():
    modules = project_modules()
    assert len(modules) > 30
    assert violations(modules) == []


def test_package_graph_has_no_cycle():
    graph = {}
    for unit, path in project_modules():
        graph.setdefault(unit, set()).update(imported_units(path) - {unit})
    state = {}

    def visit(unit, trail):
        if state.get(unit) == "open":
            pytest.fail("import cycle: " + " -> ".join(trail + [unit]))
        if state.get(unit) != "done":
            state[unit] = "open"
            for target in sorted(graph.get(unit, ())):
                visit(target, trail + [unit])
            state[unit] = "done"

    for unit in sorted(graph):
        visit(unit, [])


def test_the_rule_catches_an_upward_import(tmp_path):
    upward = tmp_path / "bad.py"
    upward.write_text("def f():\n    from optim.runner import run_training\n")
    inside = tmp_path / "fine.py"
    inside.write_text("import torch\nfrom utils.config import build_config\n")
    assert violations([("inference", str(upward)), ("inference", str(inside))]) == [
        f"{os.path.relpath(upward, ROOT)} (inference, level 2) imports optim (level 3)"]


def test_documents_and_sections_the_code_points_to_exist():
    """Every document under docs/ that a file names exists, and every section reference names
    a section of docs/method.md."""
    text_files = [os.path.join(dirpath, f) for dirpath, dirs, files in os.walk(ROOT)
                  if not any(part.startswith(".") or part in ("data", "work_dirs")
                             for part in os.path.relpath(dirpath, ROOT).split(os.sep)[:1])
                  for f in files if f.endswith((".py", ".md"))]
    sections = set(re.findall(r"^## (\d+)\.", open(os.path.join(ROOT, "docs", "method.md")).read(),
                              re.M))
    missing = []
    for path in text_files:
        text = open(path).read()
        for doc in re.findall(r"docs/[\w./-]+\.md", text):
            if not os.path.isfile(os.path.join(ROOT, doc)):
                missing.append(f"{os.path.relpath(path, ROOT)} -> {doc}")
        for section in re.findall(r"docs/method\.md §(\d+)", text):
            if section not in sections:
                missing.append(f"{os.path.relpath(path, ROOT)} -> docs/method.md §{section}")
    assert len(text_files) > 30 and missing == []
