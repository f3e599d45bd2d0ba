"""Every ```python block of README.md runs as written, copy-pasted into a fresh interpreter, in a
temporary folder. The snippets keep their sizes small (max_len 1024, a few hundred tokens) so this
stays quick; their asserts are the README's claims of exactness."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```$", README.read_text(), flags=re.S | re.M)


def _title(code):
    """The README section a block sits in, for the test id."""
    text = README.read_text()
    heading = re.findall(r"^#+ (.+)$", text[: text.index(code)], flags=re.M)[-1]
    return re.sub(r"\W+", "_", heading).strip("_")[:40]


def test_the_readme_has_its_snippets():
    assert len(BLOCKS) >= 3, "the README's ```python blocks were not found"


@pytest.mark.parametrize("code", BLOCKS, ids=[_title(b) for b in BLOCKS])
def test_readme_snippet_runs(code, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the installed package, as a reader has it
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, f"README snippet failed:\n{code}\n--- stderr ---\n{out.stderr[-3000:]}"
    assert list(tmp_path.iterdir()) == []  # and wrote nothing where it ran
