"""The wheel installs lcsm_compile, lcsm_compile.passes and lcsm_compile.kernels, and nothing top-level else."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
        check=True,
    )
    (path,) = out.glob("lcsm_compile-*.whl")
    return path


def test_wheel_layout(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert top == {"lcsm_compile", f"lcsm_compile-{wheel.name.split('-')[1]}.dist-info"}
    for module in ("lcsm_compile/passes/__init__.py", "lcsm_compile/kernels/__init__.py", "lcsm_compile/kernels/reference.py"):
        assert module in names
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "lcsm-compile = lcsm_compile.cli:main" in entry_points


def test_wheel_imports_in_fresh_venv(wheel, tmp_path):
    # A venv that sees the system's torch (no multi-GB download) but gets lcsm_compile only from the wheel.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True)
    code = (
        "import importlib.util, sys, lcsm_compile, lcsm_compile.passes, lcsm_compile.kernels.reference;"
        "assert lcsm_compile.__file__.startswith(sys.prefix), lcsm_compile.__file__;"
        "assert lcsm_compile.kernels.__file__.startswith(sys.prefix);"
        "assert importlib.util.find_spec('passes') is None and importlib.util.find_spec('kernels') is None;"
        "print('ok')"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([str(py), "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True).stdout.strip()
    assert not (Path(site) / "passes").exists() and not (Path(site) / "kernels").exists()
