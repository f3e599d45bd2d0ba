"""The wheel installs lcsm_compile, lcsm_compile.passes and lcsm_compile.kernels, and nothing top-level
else; installed in a fresh virtualenv it imports and its two entry points run as processes.

Everything is built and installed under temporary folders: the source tree is copied first, so the
build writes no build/ or *.egg-info into the repository.
"""

import json
import os
import shutil
import site
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# what the wheel is built from (pyproject.toml names README.md and these three package folders)
SOURCES = ("pyproject.toml", "README.md", "lcsm_compile", "passes", "kernels")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    for name in SOURCES:
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(ROOT / name, src / name, **({"ignore": shutil.ignore_patterns("__pycache__")} if copy is shutil.copytree else {}))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)],
        check=True,
    )
    (path,) = out.glob("lcsm_compile-*.whl")
    return path


def _requirements(wheel):
    """Requires-Dist names of the wheel without an extra (what `pip install lcsm-compile` pulls)."""
    with zipfile.ZipFile(wheel) as z:
        text = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    reqs = [ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("Requires-Dist:")]
    base = [r for r in reqs if "extra ==" not in r]
    return [r.split(";")[0].split(">")[0].split("=")[0].split("<")[0].split("[")[0].strip() for r in base], reqs


def test_wheel_layout(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert top == {"lcsm_compile", f"lcsm_compile-{wheel.name.split('-')[1]}.dist-info"}
    for module in ("lcsm_compile/passes/__init__.py", "lcsm_compile/kernels/__init__.py", "lcsm_compile/kernels/reference.py",
                   "lcsm_compile/runtime/__init__.py", "lcsm_compile/runtime/session.py"):
        assert module in names
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "lcsm-compile = lcsm_compile.tools.cli:main" in entry_points


def test_triton_is_an_extra_not_a_dependency(wheel):
    base, every = _requirements(wheel)
    assert "triton" not in base and "torch" in base
    gpu = [r for r in every if r.startswith("triton") and 'extra == "gpu"' in r]
    test = [r for r in every if r.startswith("triton") and 'extra == "test"' in r]
    assert gpu and test, every  # CUDA users get it with [gpu]; the interpreter kernel tests with [test]


def _dependency_dirs(wheel):
    """Where the running interpreter finds the wheel's dependencies: its site folders and each
    dependency's own location (a venv, --user, a plain interpreter alike)."""
    dirs = list(site.getsitepackages())
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    for name in _requirements(wheel)[0]:
        try:
            dirs.append(str(metadata.distribution(name).locate_file("")))
        except metadata.PackageNotFoundError:
            pytest.fail(f"{name}, a dependency of lcsm-compile, is not installed in {sys.executable}")
    return list(dict.fromkeys(d for d in dirs if os.path.isdir(d)))


def test_wheel_installs_and_runs_in_fresh_venv(wheel, tmp_path):
    """A venv made without --system-site-packages (which would show the *base* interpreter, where
    torch need not be) that sees this interpreter's dependencies through a .pth file and gets
    lcsm_compile only from the wheel. A .pth line is a plain path: .pth files inside those folders
    (an editable install of lcsm_compile there) are not processed."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    paths = json.loads(subprocess.run([str(py), "-c", "import json, sysconfig; print(json.dumps(sysconfig.get_paths()))"],
                                      capture_output=True, text=True, check=True).stdout)
    (Path(paths["purelib"]) / "_outer_dependencies.pth").write_text("\n".join(_dependency_dirs(wheel)) + "\n")
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["OMP_NUM_THREADS"] = "1"
    code = (
        "import importlib.util, sys, torch, lcsm_compile, lcsm_compile.passes, lcsm_compile.kernels.reference;"
        "assert lcsm_compile.__file__.startswith(sys.prefix), lcsm_compile.__file__;"
        "assert lcsm_compile.kernels.__file__.startswith(sys.prefix);"
        "assert not torch.__file__.startswith(sys.prefix), torch.__file__;"
        "assert importlib.util.find_spec('passes') is None and importlib.util.find_spec('kernels') is None;"
        "print('ok')"
    )
    out = subprocess.run([str(py), "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
    assert not (Path(paths["purelib"]) / "passes").exists() and not (Path(paths["purelib"]) / "kernels").exists()

    # both entry points, as processes: `python -m lcsm_compile` and the installed script
    out = subprocess.run([str(py), "-m", "lcsm_compile", "--help"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("usage: lcsm-compile"), out.stderr[-3000:]
    script = Path(paths["scripts"]) / "lcsm-compile"
    out = subprocess.run([str(script), "tune", "--channels", "4", "--max-size", "2", "--no-save", "--json"],
                         cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    data = json.loads(out.stdout)
    assert [U for U, _, _ in data["rows"]] == [1, 2] and data["device"] == "cpu"


WITHOUT_TRITON = r"""
import sys
sys.modules["triton"] = None  # `import triton` raises ImportError, as where it is not installed
import torch, lcsm_compile
from lcsm_compile.generation import naive_generate
from lcsm_compile.models import demo_lm

def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())

model = demo_lm(n_layer=1, d_model=16, vocab=32, max_len=48)
ids = torch.randint(0, 32, (1, 40))
decoder = lcsm_compile.optimize(model, (ids[:, :16],), compile=True)  # inductor's CPU code needs no triton
with torch.no_grad():
    assert torch.equal(decoder.generate(ids[:, :8], 12), naive_generate(model, ids[:, :8], 12))
    compiled = torch.compile(model, backend="lcsm", dynamic=True, options={"max_len": 48})
    for t in (10, 11):
        assert rel(compiled(ids[:, :t]), model(ids[:, :t])) < 1e-5
assert lcsm_compile.backend.records[-1].kind == "decode"
assert not lcsm_compile.OnlineConv(torch.randn(2, 8)).use_triton
try:
    lcsm_compile.OnlineConv(torch.randn(2, 8), kernels="triton")
except ModuleNotFoundError as exc:
    assert exc.name == "triton" and "lcsm-compile[gpu]" in str(exc), exc
else:
    raise AssertionError("kernels='triton' without triton: no error")
print("ok")
"""


def test_torch_paths_run_without_triton():
    """triton is an extra: without it the package imports, decodes (compiled step included), runs the
    backend, and asking for the Triton kernels names the extra that installs them."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", WITHOUT_TRITON], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def _imports(path, modules):
    """The modules of `modules` that the file imports, at any level (lazy imports in functions too)."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:  # `from package import module` imports the module
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found & set(modules)


def test_no_module_imports_in_a_circle():
    """The library's modules import one another in one direction: the runtime never reaches the
    passes or the pipeline, the pipeline builds the Decoder from its plan, and no cycle is held
    together by a lazy import. Packages' own __init__ re-exports are not edges."""
    import networkx as nx

    modules = {}
    for folder, package in (("lcsm_compile", "lcsm_compile"), ("passes", "lcsm_compile.passes"),
                            ("kernels", "lcsm_compile.kernels")):
        for path in (ROOT / folder).rglob("*.py"):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if parts[-1] != "__init__":
                modules[".".join((package, *parts))] = path
    graph = nx.DiGraph()
    for name, path in modules.items():
        graph.add_edges_from((name, other) for other in _imports(path, modules) if other != name)
    assert graph.number_of_edges() > 50  # the walk found the imports
    assert list(nx.simple_cycles(graph)) == []
    runtime = [m for m in modules if m.startswith("lcsm_compile.runtime.")]
    reached = set().union(*(nx.descendants(graph, m) for m in runtime))
    assert not {m for m in reached if m.startswith("lcsm_compile.passes.")} | ({"lcsm_compile.pipeline", "lcsm_compile.analysis",
                                                                              "lcsm_compile.decoder"} & reached)
