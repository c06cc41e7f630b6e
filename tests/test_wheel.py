"""kvtrain installed as a wheel (not editable) runs its quickstart from a directory outside the checkout: every
file the package reads at run time (the quickstart's recipe above all) ships as package data.

The venv reuses the dependencies of the environment running the tests (a `.pth` file naming its site-packages
folders), so that the test costs minutes, not a download of torch, and needs nothing but what `.ci/run` installed:
not `--system-site-packages`, which would reach the *base* interpreter's packages, empty on a fresh machine. Those
folders' own `.pth` files are not run, so the checkout's editable install stays out of the wheel's venv; the wheel's
`kvtrain` is the one imported, which the test checks first."""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("wheel")
    # Built from a clean copy: a `build/` folder left in the checkout would feed stale files into the wheel.
    source = work / "source"
    shutil.copytree(ROOT, source, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", ".venv*", "runs", "__pycache__", ".pytest_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(work / "dist"), str(source)], check=True)
    (wheel,) = (work / "dist").glob("kvtrain-*.whl")
    env_dir = work / "venv"
    venv.create(env_dir, with_pip=True)
    subprocess.run([env_dir / "bin" / "python", "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                   check=True)
    # After the install, so that pip never sees (nor offers to replace) the checkout's editable kvtrain.
    (site_packages,) = (env_dir / "lib").glob("python*/site-packages")
    (site_packages / "tests-environment.pth").write_text("\n".join(_site_packages_of_this_process()) + "\n")
    return env_dir


def _site_packages_of_this_process() -> list[str]:
    """The site-packages folders the running interpreter imports from (its venv's, and the base's where that venv
    sees them): exactly the dependencies the tests themselves use."""
    folders = [*site.getsitepackages(), site.getusersitepackages()] if site.ENABLE_USER_SITE else site.getsitepackages()
    return [f for f in dict.fromkeys(folders) if f in sys.path and Path(f).is_dir()]


def test_the_wheel_ships_the_recipes_and_shadows_the_checkout(wheel_venv, tmp_path):
    code = ("import json, kvtrain, kvtrain.quickstart as q; "
            "print(json.dumps([kvtrain.__file__, str(q.RECIPE), q.RECIPE.is_file()]))")
    out = subprocess.run([wheel_venv / "bin" / "python", "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": ""})
    package, recipe, exists = json.loads(out.stdout)
    assert Path(package).is_relative_to(wheel_venv) and Path(recipe).is_relative_to(wheel_venv) and exists


def test_quickstart_runs_from_the_wheel_outside_the_checkout(wheel_venv, tmp_path):
    out = tmp_path / "quickstart"
    subprocess.run([wheel_venv / "bin" / "kvtrain", "quickstart", "--steps", "2", "--eval-blocks", "1", "--out",
                    str(out)], cwd=tmp_path, check=True, env={**os.environ, "PYTHONPATH": ""}, timeout=900)
    report = json.loads((out / "report.json").read_text())
    assert len(report["loyalty"]) == 2 and (out / "model" / "kv_compression" / "config.json").is_file()
