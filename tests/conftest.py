import os
import sys
from pathlib import Path

import torch

# The model zoo lives in examples/ at the repository root, outside the installed package.
ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Under pytest-xdist (-n auto) the workers share the cores: each takes its share of torch's threads,
# so that two workers on two cores do not oversubscribe them.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
