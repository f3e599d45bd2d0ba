import sys
from pathlib import Path

# The model zoo lives in examples/ at the repository root, outside the installed package.
ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
