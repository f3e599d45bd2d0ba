"""The hybrid crossover: the largest tile size computed directly rather than by FFT.

`lcsm-compile tune` measures it on this machine and caches it in the user cache dir, keyed by
device and torch version; without a cached value a safe default is used.
"""

import json
import os
import time

import torch

from lcsm_compile.errors import DeviceError

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


def _load() -> dict:
    try:
        with open(cache_path()) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def crossover_for(device) -> int:
    """The tuned crossover for this device, else the default for its type."""
    device = torch.device(device)
    entry = _load().get(device_key(device))
    if entry is not None:
        return int(entry["crossover"])
    return DEFAULTS.get(device.type, 32)


def _best_time(fn, repeats):
    fn()  # warm-up: first calls pay for allocation and plan caches
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def check_device(device) -> torch.device:
    """`device` as a torch.device that can run here: cpu, or cuda[:N] with CUDA available."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise DeviceError(f"device: expected 'cpu' or 'cuda[:N]', got {device!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise DeviceError(f"device: expected 'cpu' or 'cuda[:N]', got {device!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            raise DeviceError(f"device {device!r}: expected a CUDA device, but {why} (torch {torch.__version__}); "
                              "use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"device {device!r}: expected an index below {torch.cuda.device_count()} (CUDA devices here)")
    return dev


def measure(device="cpu", channels=1024, max_size=256, repeats=20):
    """Time one direct and one FFT tile per size U on `device`; returns [(U, direct_s, fft_s)]."""
    from lcsm_compile.kernels import reference as k

    device = check_device(device)
    rows = []
    U = 1
    while U <= max_size:
        h = torch.randn(channels, 4 * U, device=device)
        Xb, Ab = torch.randn(2 * U, 1, channels, device=device), torch.zeros(2 * U, 1, channels, device=device)
        Xc, Ac = torch.randn(1, channels, 4 * U, device=device), torch.zeros(1, channels, 4 * U, device=device)
        T, S = k.toeplitz(h, U).contiguous(), k.tile_spectrum(h, U)
        direct = _best_time(lambda: k.direct_tile_from_toeplitz(Xb, Ab, T, 0, U, 2 * U, U), repeats)
        fft = _best_time(lambda: k.fft_tile(Xc, Ac, S, 0, U, 2 * U, U), repeats)
        rows.append((U, direct, fft))
        U *= 2
    return rows


def choose_crossover(rows) -> int:
    """Largest U such that the direct tile is no slower than the FFT tile at every size up to U."""
    crossover = 1
    for U, direct, fft in rows:
        if direct > fft:
            break
        crossover = U
    return crossover


def tune(device="cpu", channels=1024, max_size=256, save=True):
    """Measure, choose and (optionally) cache the crossover for `device`. Returns (crossover, rows)."""
    rows = measure(device, channels, max_size)
    crossover = choose_crossover(rows)
    if save:
        cache = _load()
        cache[device_key(device)] = {"crossover": crossover, "channels": channels, "rows": rows}
        os.makedirs(os.path.dirname(cache_path()), exist_ok=True)
        with open(cache_path(), "w") as f:
            json.dump(cache, f, indent=1)
    return crossover, rows
