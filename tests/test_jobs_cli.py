"""The jobs' command line: installed console scripts, `--help` as written, one-line error exits.

No Ray starts here: `--help` and config errors exit before any job connects to Ray.
"""

from __future__ import annotations

import dataclasses
import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from jobs.common import config_sections, main_guard
from jobs.config import RunConfig
from rec.artifacts import ArtifactError
from rec.config_loader import ConfigError
from rec.data.textio import DataError
from rec.storage import StorageError

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
BIN = Path(sys.executable).parent


def example_lines(module) -> list[str]:
    """The docstring's example commands: its indented lines, as written in the source."""
    return [line for line in module.__doc__.splitlines() if line.startswith("    ")]


def test_every_job_has_a_console_script():
    jobs = {p.stem for p in (ROOT / "jobs").glob("*.py") if "def main(" in p.read_text()}
    assert {target.split(":")[0] for target in SCRIPTS.values()} == {f"jobs.{j}" for j in jobs}
    for name, target in SCRIPTS.items():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func)), name
        assert name == "raydiv-" + module.removeprefix("jobs.").replace("_", "-")


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_installed_script_help_keeps_examples_and_lists_sections(name):
    script = BIN / name
    assert script.exists(), f"{script} missing: reinstall the project (make install)"
    out = subprocess.run(
        [str(script), "--help"], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    module = importlib.import_module(SCRIPTS[name].split(":")[0])
    examples = example_lines(module)
    assert examples, f"{module.__name__} docstring has no example command"
    for line in examples:  # verbatim, not reflowed into a paragraph
        assert line in out.splitlines(), f"{name} --help lost the line {line!r}"
    assert "config sections" in out
    listed = out.split("config sections", 1)[1].splitlines()
    for f in dataclasses.fields(RunConfig):
        assert any(row.split()[:1] == [f.name] for row in listed), f"section {f.name} missing"


def test_docstrings_are_shown_as_written():
    # A backslash continuation in a non-raw docstring joins its lines before argparse sees them:
    # the docstring Python shows must be the text in the source file.
    for target in SCRIPTS.values():
        module = importlib.import_module(target.split(":")[0])
        source = Path(module.__file__).read_text()
        assert module.__doc__ in source, f'{module.__name__}: make its docstring raw (r""")'


def test_config_sections_describe_every_top_level_key():
    rows = config_sections(RunConfig).splitlines()
    starts = {row.split()[0]: row for row in rows if not row.startswith(" " * 14)}
    assert list(starts) == [f.name for f in dataclasses.fields(RunConfig)]
    for name, row in starts.items():
        assert len(row.split()) > 2, f"no description for {name}"
        assert len(row) <= 100
    assert "Ray Train + DeepSpeed training" in starts["train"]


@pytest.mark.parametrize(
    "error", [ConfigError("c"), DataError("d"), StorageError("s3://b/k: s"), ArtifactError("a")]
)
def test_main_guard_exits_2_with_one_line(error, capsys):
    def fail():
        raise error

    assert main_guard(fail) == 2
    err = capsys.readouterr().err
    assert err == f"error: {error}\n"


def test_main_guard_lets_bugs_raise():
    def bug():
        raise KeyError("a bug keeps its traceback")

    with pytest.raises(KeyError):
        main_guard(bug)


def test_installed_script_config_error_is_one_line(tmp_path):
    out = subprocess.run(
        [str(BIN / "raydiv-prepare"), "--config", str(tmp_path / "missing.yaml")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"error: config file not found: '{tmp_path}/missing.yaml'"
    ]
