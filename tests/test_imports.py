"""The package's import structure: every module imports on its own, the pure layers import
without Ray, and no two modules import each other (lazy imports inside functions included)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "slmrl_ray"

# Modules that need a package outside the install's required dependencies, with the reason.
# None today: fastapi/pydantic come with ray[serve], and the optional ones (gguf, httpx) are
# imported inside the functions that use them.
NEEDS_OPTIONAL: dict[str, str] = {}

# Ray lives at the edges (tuning/, serving/); these import with `ray` unavailable.
RAY_FREE = (
    "slmrl_ray.config", "slmrl_ray.data", "slmrl_ray.corpora", "slmrl_ray.rl_math", "slmrl_ray.metrics",
    "slmrl_ray.storage", "slmrl_ray.artifacts", "slmrl_ray.pipeline", "slmrl_ray.rewards", "slmrl_ray.scoring",
    "slmrl_ray.models", "slmrl_ray.stages.prepare", "slmrl_ray.stages.sft", "slmrl_ray.stages.reward",
    "slmrl_ray.stages.ppo", "slmrl_ray.stages.ppo_model", "slmrl_ray.stages.ppo_state", "slmrl_ray.stages.trl_rl",
    "slmrl_ray.stages.rl", "slmrl_ray.stages.evaluate",
)


def module_names() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=PACKAGE.parent, capture_output=True, text=True,
                          timeout=600)


def test_every_module_imports_first_in_a_fresh_interpreter():
    """One interpreter; before each module, every slmrl_ray module is dropped from sys.modules, so
    each is the first of the package to load (as in a fresh process) while torch & co. load once."""
    modules = [m for m in module_names() if m not in NEEDS_OPTIONAL]
    code = f"""
import importlib, json, sys, traceback
failed = {{}}
for name in {modules!r}:
    for loaded in [m for m in sys.modules if m == "slmrl_ray" or m.startswith("slmrl_ray.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception:
        failed[name] = traceback.format_exc(limit=-3)
print(json.dumps(failed))
"""
    done = run_python(code)
    assert done.returncode == 0, done.stderr
    failed = json.loads(done.stdout.strip().splitlines()[-1])
    assert not failed, "\n".join(f"{name}:\n{error}" for name, error in failed.items())


def test_config_data_math_storage_and_stages_import_without_ray():
    # `None` in sys.modules: `import ray` raises ImportError and find_spec("ray") says "not installed".
    code = f"""
import importlib, sys
sys.modules["ray"] = None
for name in {RAY_FREE!r}:
    importlib.import_module(name)
print(sorted(m for m in sys.modules if m.startswith("ray.")))
"""
    done = run_python(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def imported_modules(module: str, path: Path, known: set[str]) -> set[str]:
    """The package modules `path` imports, anywhere in the file (inside functions too)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from a.b import c` loads a.b, and a.b.c when c is a module.
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in known and t != module)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_lazy_ones_included():
    names = module_names()
    known = set(names)
    paths = {name: PACKAGE.parent / (name.replace(".", "/") + ("/__init__.py" if (
        PACKAGE.parent / name.replace(".", "/")).is_dir() else ".py")) for name in names}
    graph = {name: imported_modules(name, paths[name], known) for name in names}
    assert graph["slmrl_ray.stages.rl"] >= {"slmrl_ray.stages.ppo", "slmrl_ray.stages.trl_rl"}  # sees lazy imports
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_a_lazy_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
