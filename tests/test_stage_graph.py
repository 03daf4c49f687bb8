"""dvc.yaml never lies about code: each stage's code deps are exactly the files the stage runs.

A dep missing means an edit reruns nothing and results go stale; a dep too broad means an edit
reruns training for nothing. The expected deps are the stage module's import closure
(:func:`vift.closure.closure`), written as whole folders where every file of the folder is in it.
Run this file as a script with stage names to print the deps dvc.yaml should list, or with
``--write`` to rewrite them in dvc.yaml (comments and non-code deps kept).
"""

from __future__ import annotations

import pkgutil
import sys
from pathlib import Path

import yaml

import vift.stages
from vift.closure import ROOT, closure
from vift.paths import STAGES, TRAINING_STAGES

CODE_ROOTS = ("vift/", "flows/")
# The stages whose outputs carry code: the registered model ships the files its loader imports.
SHIPPED = {"register": ("vift.registry.served_model",)}


def dvc_stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def python_files(folder: Path) -> set[Path]:
    return {p.relative_to(ROOT) for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts}


def expected_code_deps(stage: str) -> list[str]:
    """The stage's closure, with every folder whose files are all in it named as the folder."""
    files = set(closure(f"vift.stages.{stage}", *SHIPPED.get(stage, ())))
    deps: set[Path] = set()
    for file in files:
        covering = file
        for folder in file.parents:
            if folder == Path(".") or not python_files(folder) <= files:
                break
            covering = folder
        deps.add(covering)
    return sorted(str(d) for d in deps)


def declared_code_deps(stage: str) -> list[str]:
    deps = dvc_stages()[stage].get("deps", [])
    return sorted(d.rstrip("/") for d in deps if d.startswith(CODE_ROOTS))


def test_the_stage_list_is_one_fact_in_pipeline_order():
    graph = dvc_stages()
    assert tuple(graph) == STAGES
    modules = {m.name for m in pkgutil.iter_modules(vift.stages.__path__) if not m.name.startswith("_")}
    assert modules == set(STAGES)
    assert all(graph[name]["cmd"] == f"vift stage {name}" for name in STAGES)


def test_every_stage_depends_on_exactly_the_code_it_runs():
    wrong = {}
    for stage in STAGES:
        expected, declared = expected_code_deps(stage), declared_code_deps(stage)
        if expected != declared:
            wrong[stage] = {
                "missing": sorted(set(expected) - set(declared)),
                "not run by the stage": sorted(set(declared) - set(expected)),
            }
    assert not wrong, f"dvc.yaml code deps differ from the stages' imports ({__file__} prints the right lists): {wrong}"


def test_the_closure_follows_lazy_and_relative_imports_and_parent_packages(tmp_path):
    pkg = tmp_path / "vift"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from . import helper\n")
    (pkg / "sub" / "helper.py").write_text("def f():\n    from vift import lazy\n")
    (pkg / "lazy.py").write_text("import json\n")
    (pkg / "unused.py").write_text("")
    (pkg / "entry.py").write_text("from vift.sub.helper import f\n")
    found = {str(p) for p in closure("vift.entry", root=tmp_path)}
    assert found == {"vift/__init__.py", "vift/entry.py", "vift/sub/__init__.py", "vift/sub/helper.py", "vift/lazy.py"}


def test_the_speed_benchmarks_and_real_benchmark_tools_are_in_no_stage():
    for stage in STAGES:
        files = {str(p) for p in closure(f"vift.stages.{stage}", *SHIPPED.get(stage, ()))}
        assert not {f for f in files if f.startswith(("vift/perf/", "vift/benchmarks/", "vift/cli.py", "flows/"))}, stage


def test_no_training_stage_depends_on_the_fusion_method():
    """Changing how fusion works (an inference-time method) reruns calibration and evaluation, never
    training: the training stages check their models with plain generation only."""
    for stage in ("data", "base", *TRAINING_STAGES):
        files = {str(p) for p in closure(f"vift.stages.{stage}", *SHIPPED.get(stage, ()))}
        assert not files & {"vift/fusion/method.py", "vift/fusion/hooks.py", "vift/fusion/calibrate.py", "vift/fusion/modes.py"}, stage
    assert "vift/fusion/method.py" in {str(p) for p in closure("vift.stages.calibrate")}


def write_code_deps(text: str) -> str:
    """dvc.yaml's text with each stage's code deps replaced by the expected ones (comments kept)."""
    lines, out, stage, in_deps = text.splitlines(), [], None, False
    for line in lines:
        if line.startswith("  ") and not line.startswith("   ") and line.rstrip().endswith(":"):
            stage, in_deps = line.strip()[:-1], False
        elif line == "    deps:":
            in_deps = True
            out.append(line)
            continue
        elif in_deps and not line.startswith("      - "):
            out.extend(f"      - {dep}" for dep in expected_code_deps(stage))
            in_deps = False
        if in_deps and line[len("      - ") :].startswith(CODE_ROOTS):
            continue
        out.append(line)
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:  # rewrite dvc.yaml's code deps from the stages' imports
        (ROOT / "dvc.yaml").write_text(write_code_deps((ROOT / "dvc.yaml").read_text()))
    for name in sys.argv[1:] if sys.argv[1:] != ["--write"] else []:
        print(f"{name}:")
        print("\n".join(f"  - {dep}" for dep in expected_code_deps(name)))
