"""Per-machine calibration, as the library reads it: the hybrid crossover (the largest tile size
computed directly rather than by FFT) and the costs of the decoding strategies' primitives
(lcsm_compile.costs.Costs).

`lcsm-compile tune` (lcsm_compile.tools.tune) measures both on this machine and caches them in the
user cache dir, keyed by device and torch version; without a cached value safe defaults are used.
"""

import json
import os

import torch

from lcsm_compile.costs import Costs

DEFAULTS = {"cpu": 16, "cuda": 64}


def cache_path() -> str:
    """The tuning cache: $LCSM_CACHE_DIR/tuning.json if set, else in the user cache dir."""
    import platformdirs

    folder = os.environ.get("LCSM_CACHE_DIR") or platformdirs.user_cache_dir("lcsm_compile")
    return os.path.join(folder, "tuning.json")


def device_key(device) -> str:
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return f"{name}|torch-{torch.__version__}"


def load() -> dict:
    try:
        with open(cache_path()) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def crossover_for(device) -> int:
    """The tuned crossover for this device, else the default for its type."""
    device = torch.device(device)
    entry = load().get(device_key(device))
    if entry is not None:
        return int(entry["crossover"])
    return DEFAULTS.get(device.type, 32)


def costs_for(device) -> Costs:
    """The measured costs of the strategies' primitives for this device, else the defaults."""
    entry = load().get(device_key(torch.device(device)), {})
    return Costs(**entry["costs"]) if "costs" in entry else Costs()
