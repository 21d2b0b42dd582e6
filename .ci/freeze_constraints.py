"""Write constraints.txt: the installed versions of this project's dependencies, direct and
transitive (with the extras the project asks for), read from the working venv.

    .venv/bin/python .ci/freeze_constraints.py [pyproject.toml] > constraints.txt
    (or: make constraints)
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

import tomllib
from packaging.requirements import Requirement

HEADER = """\
# Tested versions of every dependency, direct and transitive (Python 3.11, Linux x86_64),
# generated from the working venv by `make constraints` (.ci/freeze_constraints.py).
# `make install` applies it: pip install -c constraints.txt -e ".[dev]".
# torch==2.13.0 also matches the CUDA builds of that release (2.13.0+cu128 ...: pip ignores the
# local label): a GPU user installs it first from PyTorch's index, e.g.
#   make install TORCH_INDEX="--index-url https://download.pytorch.org/whl/cu128"
# (another torch release: change TORCH_SPEC in the Makefile and the torch line here together).
"""


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def project_requirements(pyproject: Path, extras: list[str]) -> list[str]:
    """The project's own requirements, read from pyproject.toml (not from a stale egg-info)."""
    project = tomllib.loads(pyproject.read_text())["project"]
    optional = project.get("optional-dependencies", {})
    return project["dependencies"] + [r for e in extras for r in optional[e]]


def closure(requirements: list[str]) -> dict[str, str]:
    """{name: version} of every installed distribution these requirements need."""
    seen: dict[str, set[str]] = {}
    todo = [(r.name, set(r.extras)) for r in map(Requirement, requirements)]
    while todo:
        name, want = todo.pop()
        key = norm(name)
        if key in seen and want <= seen[key]:
            continue
        seen[key] = seen.get(key, set()) | want
        dist = metadata.distribution(name)
        for line in dist.requires or []:
            req = Requirement(line)
            envs = [{"extra": e} for e in seen[key]] or [{"extra": ""}]
            if req.marker is None or any(req.marker.evaluate(env) for env in envs):
                todo.append((req.name, set(req.extras)))
    return {metadata.distribution(n).metadata["Name"]: metadata.version(n) for n in seen}


def main() -> None:
    pyproject = Path(sys.argv[1] if len(sys.argv) > 1 else "pyproject.toml")
    pins = closure(project_requirements(pyproject, ["dev"]))
    lines = [f"{name}=={version.split('+')[0]}" for name, version in pins.items()]
    sys.stdout.write(HEADER + "\n".join(sorted(lines, key=str.lower)) + "\n")


if __name__ == "__main__":
    main()
