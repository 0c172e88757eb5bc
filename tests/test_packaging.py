"""pyproject.toml: the checkout installs (offline, no dependencies fetched) and imports from anywhere."""
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("common", "illustration_1d", "rotation", "label_noise_mwn", "cross_domain_fewshot", "metaxl")


def run(cmd, cwd, **kwargs):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=240, **kwargs)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return proc.stdout


def test_installs_into_a_fresh_venv_and_imports_outside_the_checkout(tmp_path):
    # a copy of what the package is built from, so that the build writes nothing into the checkout
    src = tmp_path / "src"
    for name in PACKAGES:
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "figures"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path)
    python = venv / "bin" / "python"
    # offline: the fresh venv sees this environment's packages (torch, pip, setuptools, ...) through a
    # .pth file, and pip installs the checkout alone (--no-deps --no-index --no-build-isolation)
    purelib = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                       cwd=tmp_path).strip())
    (purelib / "existing_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--no-build-isolation",
         "--disable-pip-version-check", str(src)], cwd=tmp_path)
    shutil.rmtree(src)   # the installed copy must stand on its own

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = run([str(python), "-c",
               "import common.evograd, common.report, rotation.train; "
               "print(common.evograd.__file__); print(common.report.PAPER_NUMBERS.is_file())"], cwd=elsewhere)
    location, has_numbers = out.strip().splitlines()
    assert Path(location).is_relative_to(purelib) and has_numbers == "True"
    assert "usage" in run([str(python), "-m", "rotation.train", "--help"], cwd=elsewhere)


def test_pyproject_lists_every_experiment_package():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = project["tool"]["setuptools"]["packages"]
    on_disk = sorted(p.parent.name for p in ROOT.glob("*/train.py")) + ["common"]
    assert sorted(packages) == sorted(on_disk) == sorted(PACKAGES)
    requirements = {line.split("==")[0].strip().lower() for line in (ROOT / "requirements.txt").read_text().splitlines()
                    if line.strip() and not line.startswith("#")}
    declared = {d.split(">")[0].split("=")[0].strip().lower() for d in project["project"]["dependencies"]}
    assert declared == requirements - {"pytest"}
