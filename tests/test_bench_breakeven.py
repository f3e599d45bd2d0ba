"""benchmarks/compile_breakeven.py at a tiny size: the table, JSON and plot it writes, and a
break-even that is the compile time over the per-step saving it measured."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_breakeven_is_compile_time_over_the_step_saving(tmp_path):
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}  # cold, and not in /tmp's shared cache
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compile_breakeven.py"), "--configs", "1x16",
                           "--steps", "10", "--max-len", "128", "--threads", "1", "--out", str(tmp_path / "out")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "out" / "breakeven.json").read_text())
    (row,) = data["rows"]
    assert row["config"] == "1x16" and row["cold_compile_s"] > row["warm_compile_s"]  # the cache it wrote is read back
    saved = row["eager_step_s"] - row["compiled_step_s"]
    for kind in ("cold", "warm"):
        expect = row[f"{kind}_compile_s"] / saved if saved > 0 else float("inf")
        assert row[f"breakeven_{kind}"] == pytest.approx(expect)
    assert "break-even cold" in proc.stdout and f"AUTO_COMPILE_CALLS = {data['auto_compile_calls']}" in proc.stdout
    assert (tmp_path / "out" / "breakeven.png").stat().st_size > 0
