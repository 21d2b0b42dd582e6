"""The layering, checked in one place: imports point down `jobs -> serve -> rl -> rec`, and only
the thin layers that distribute the core import Ray. No Ray is started.

- every module of rec/, rl/, serve/ and jobs/ imports (a moved name leaves no broken importer);
- an `ast` walk of every file: no import points up a layer; `ray` is imported only by
  RAY_MODULES (and by RAY_INSIDE_FUNCTIONS, lazily, inside a function body);
- the core (every other module of rec/, rl/, serve/) imports in one fresh interpreter without
  pulling in ray or deepspeed, and `rec.rerank` (numpy only) without torch.
"""

from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys
from fnmatch import fnmatch
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Lowest first: a module may import its own layer and the layers before it, never after.
LAYERS = ("rec", "rl", "serve", "jobs")
# The thin layers: they distribute the core over Ray (Train, Data, RLlib, Serve, Tune).
RAY_MODULES = (
    "rec/train.py",
    "rec/ray_*.py",
    "rl/train.py",
    "serve/app.py",
    "serve/ray_*.py",
    "jobs/*.py",
)
# RLlib's RLModule is the policy's checkpoint format: loaded inside LamPolicy's methods only,
# so importing the module (Serve's replicas, the RL env) stays Ray-free.
RAY_INSIDE_FUNCTIONS = ("rl/policy.py",)


def source_files() -> list[Path]:
    """Every .py file of the four layers, as paths relative to the repo root."""
    return sorted(p.relative_to(ROOT) for layer in LAYERS for p in (ROOT / layer).rglob("*.py"))


def module_name(path: Path) -> str:
    parts = path.with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_thin(path: Path) -> bool:
    return any(fnmatch(path.as_posix(), pattern) for pattern in RAY_MODULES)


def imports(path: Path, source: str | None = None) -> list[tuple[int, str, str, bool]]:
    """(line, imported module, statement, inside a function) for every import in the file;
    relative imports are resolved against the file's package."""
    if source is None:
        source = (ROOT / path).read_text()
    tree = ast.parse(source, filename=str(path))
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found: list[tuple[int, str, str, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.Import):
                for alias in child.names:
                    found.append((child.lineno, alias.name, ast.unparse(child), in_function))
            elif isinstance(child, ast.ImportFrom):
                base = package[: len(package) - child.level + 1] if child.level else []
                target = ".".join([*base, *([child.module] if child.module else [])])
                found.append((child.lineno, target, ast.unparse(child), in_function))
            visit(child, nested)

    visit(tree, False)
    return found


def core_modules() -> list[str]:
    """Modules of rec/, rl/ and serve/ outside the thin layers: they must import without Ray."""
    return [
        module_name(p)
        for p in source_files()
        if p.parts[0] != "jobs" and not is_thin(p) and p.as_posix() not in RAY_INSIDE_FUNCTIONS
    ] + [module_name(Path(p)) for p in RAY_INSIDE_FUNCTIONS]


def test_every_module_imports():
    failed = []
    for path in source_files():
        try:
            importlib.import_module(module_name(path))
        except Exception as err:  # collect them all: one run names every broken module
            failed.append(f"{path}: {type(err).__name__}: {err}")
    assert not failed, "modules that fail to import:\n" + "\n".join(failed)


def test_imports_point_down_the_layers():
    upward = []
    for path in source_files():
        rank = LAYERS.index(path.parts[0])
        for line, target, statement, _ in imports(path):
            top = target.split(".")[0]
            if top in LAYERS and LAYERS.index(top) > rank:
                upward.append(f"{path}:{line}: `{statement}` points up ({path.parts[0]} -> {top})")
    assert not upward, "imports must point down jobs -> serve -> rl -> rec:\n" + "\n".join(upward)


def test_only_the_thin_layers_import_ray():
    misplaced = []
    for path in source_files():
        if is_thin(path):
            continue
        lazy_ok = path.as_posix() in RAY_INSIDE_FUNCTIONS
        for line, target, statement, in_function in imports(path):
            if target.split(".")[0] == "ray" and not (lazy_ok and in_function):
                misplaced.append(f"{path}:{line}: `{statement}`")
    assert not misplaced, (
        f"ray may be imported only by {', '.join(RAY_MODULES)} "
        f"(inside functions: {', '.join(RAY_INSIDE_FUNCTIONS)}); found:\n" + "\n".join(misplaced)
    )


def test_allow_lists_name_real_files():
    files = {p.as_posix() for p in source_files()}
    for pattern in (*RAY_MODULES, *RAY_INSIDE_FUNCTIONS):
        assert any(fnmatch(f, pattern) for f in files), f"{pattern!r} matches no file: update it"


def test_core_imports_without_ray_in_a_fresh_process():
    # One interpreter for the whole core: record which import first pulls a heavy package in.
    code = """
import importlib, json, sys
import rec.rerank
report = {"rerank": sorted({"ray", "torch"} & set(sys.modules)), "first": {}}
for name in json.loads(sys.argv[1]):
    importlib.import_module(name)
    for heavy in ("ray", "deepspeed"):
        if heavy in sys.modules and heavy not in report["first"]:
            report["first"][heavy] = name
print(json.dumps(report))
"""
    modules = core_modules()
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(modules)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["rerank"] == [], f"rec.rerank pulls in {report['rerank']}"
    assert report["first"] == {}, f"first imported by (package: module) {report['first']}"
    assert len(modules) > 20 and "rec.rerank" in modules and "rl.env" in modules


def test_the_import_walk_resolves_relative_and_lazy_imports():
    # The checker itself: a checker that finds nothing would pass every test above.
    source = (
        "from serve.engine import Scorer\nfrom ..model import Encoder\nfrom . import batch\n"
        "class A:\n    def f(self):\n        import ray.train\n"
    )
    found = imports(Path("rec/data/example.py"), source)
    assert [(line, target, lazy) for line, target, _, lazy in found] == [
        (1, "serve.engine", False),
        (2, "rec.model", False),
        (3, "rec.data", False),
        (6, "ray.train", True),
    ]
    assert module_name(Path("rec/data/__init__.py")) == "rec.data"
    assert is_thin(Path("jobs/train.py")) and not is_thin(Path("rec/model.py"))
