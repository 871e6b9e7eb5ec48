"""colintern installed as a wheel (not editable) works from another directory: presets, the shipped InternVL3.5
configs and the leaderboard references are package data, and scripts find them without the source checkout."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A wheel of this checkout installed into its own folder (its dependencies come from the test's environment)."""
    work = tmp_path_factory.mktemp("install")
    wheel_dir, target = work / "wheel", work / "site"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheel_dir),
         str(REPO_ROOT)], capture_output=True, text=True, timeout=300,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = next(wheel_dir.glob("colintern-*.whl"))
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return target


def _run_installed(installed: Path, cwd: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    # The installed copy comes first on the path; the checkout is not on it (scripts run from their own folder).
    env = {**os.environ, "PYTHONPATH": str(installed), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_the_installed_package_is_not_the_checkout(installed, tmp_path):
    done = _run_installed(installed, tmp_path, "-c", "import colintern, mteb_wrappers; print(colintern.__file__)")
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()).is_relative_to(installed)


def test_installed_scripts_find_presets_and_references(installed, tmp_path, colintern_home):
    compared = _run_installed(installed, tmp_path, str(REPO_ROOT / "scripts" / "compare_models.py"), "colpali-v1.3")
    assert compared.returncode == 0, compared.stderr[-3000:]
    assert "colpali-v1.3" in compared.stdout

    out = tmp_path / "run"
    trained = _run_installed(installed, tmp_path, str(REPO_ROOT / "scripts" / "train.py"), "--preset", "demo",
                             "--max-steps", "2", "--eval-split", "none", "--output-dir", str(out))
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert (out / "colintern_run.json").is_file()
    assert any(out.glob("*.safetensors"))
