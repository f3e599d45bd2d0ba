"""Triton kernels vs the torch reference kernels: correctness on CUDA, then timings.

    python benchmarks/triton_kernels.py --out triton_kernels.json       # on a CUDA machine (H200)
    python benchmarks/triton_kernels.py --interpret-smoke --out smoke.json  # tiny run, CPU interpreter

Correctness: both kernels against lcsm_compile.kernels.reference in fp32 and bf16 IO (fp32 state),
exits 1 (after writing the JSON) if any error passes its tolerance.
Timings, for N in {1, 8} rows, C in {512, 2048, 8192} channels, tile sizes U in {1 .. 64}:
- update: the fused red cell vs reference.update (bf16 and fp32 IO);
- direct: the Triton tile vs reference.direct_tile_from_toeplitz (the engine's torch path, with a
  precomputed Toeplitz block), and reference.fft_tile of the same size for the crossover;
each as GPU time (triton.testing.do_bench, median) and host time per call (a loop of back-to-back
calls, synchronised once: what a decode step pays, Python launch overhead included).
--sweep-block-c also times the direct tile for several channel blocks at C = 2048, N = 8.
"""

import argparse
import json
import os
import platform
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="path of the JSON results")
    p.add_argument("--interpret-smoke", action="store_true", help="tiny run under the Triton interpreter (no GPU)")
    p.add_argument("--sweep-block-c", action="store_true", help="also time channel blocks 16..256 at C=2048, N=8")
    return p.parse_args(argv)


ARGS = parse_args()
if ARGS.interpret_smoke:
    os.environ["TRITON_INTERPRET"] = "1"  # before the first `import triton`

import torch  # noqa: E402

if not ARGS.interpret_smoke and not torch.cuda.is_available():
    print("triton_kernels.py: no CUDA device (torch.cuda.is_available() is False); this benchmark needs a GPU. "
          "Use --interpret-smoke for a tiny correctness/timing run under the Triton interpreter.", file=sys.stderr)
    sys.exit(2)

from lcsm_compile.kernels import reference  # noqa: E402
from lcsm_compile.kernels import triton_common as common  # noqa: E402

triton = common.require_triton()
import triton.testing  # noqa: E402

from lcsm_compile.kernels.triton_direct import direct_tile  # noqa: E402
from lcsm_compile.kernels.triton_update import update  # noqa: E402

SMOKE = ARGS.interpret_smoke
DEVICE = "cpu" if SMOKE else "cuda"
NS = (1, 2) if SMOKE else (1, 8)
CS = (37,) if SMOKE else (512, 2048, 8192)
US = (1, 2, 4) if SMOKE else (1, 2, 4, 8, 16, 32, 64)
TOL = {torch.float32: 1e-6, torch.bfloat16: 1e-2}


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def gpu_us(fn):
    """Median GPU time of one call in microseconds (the interpreter has no CUDA events: host time)."""
    if SMOKE:
        return host_us(fn, reps=3)
    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median") * 1e3


def host_us(fn, reps=None):
    """Host time per call of back-to-back calls, synchronised once: launch overhead included."""
    reps = reps or (3 if SMOKE else 200)
    fn()
    sync()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - start) / reps * 1e6


# -- correctness --------------------------------------------------------------------------------
def check_correctness():
    rows = []
    N, C = (2, 37) if SMOKE else (8, 2048 + 37)  # C off the channel blocks: the masks are exercised
    for io in (torch.float32, torch.bfloat16):
        B = 8
        X, A = torch.randn(B, N, C, device=DEVICE), torch.randn(B, N, C, device=DEVICE)
        h0, x = torch.randn(C, device=DEVICE), torch.randn(N, C, device=DEVICE).to(io)
        Xr, yr, y = X.clone(), torch.empty(N, C, dtype=io, device=DEVICE), torch.empty(N, C, dtype=io, device=DEVICE)
        reference.update(Xr, A.clone(), x, h0, 3, yr)
        update(X, A, x, h0, 3, y)
        err = max(common.rel_err(y, yr), common.rel_err(X, Xr))
        rows.append({"kernel": "update", "io_dtype": str(io), "rel_err": err, "ok": err <= TOL[io]})
    for U in US:
        for m in (U, max(1, U // 2)):  # full and partial tiles
            B = 2 * U
            X, A = torch.randn(B, N, C, device=DEVICE), torch.randn(B, N, C, device=DEVICE)
            h = torch.randn(C, 2 * U - 1 if U > 1 else 2, device=DEVICE)  # one lag short of 2U: masked
            A0, Ar = A.clone(), A.clone()
            reference.direct_tile(X, Ar, h, 0, U, U + m, U)
            direct_tile(X, A, h, 0, U, U + m, U)
            err = common.rel_err(A - A0, Ar - A0)
            rows.append({"kernel": "direct_tile", "U": U, "m": m, "rel_err": err, "ok": err <= TOL[torch.float32]})
    return rows


# -- timings ------------------------------------------------------------------------------------
def time_update():
    rows = []
    for N in NS:
        for C in CS:
            for io in (torch.bfloat16, torch.float32):
                X = torch.randn(128, N, C, device=DEVICE)
                A, h0 = torch.randn_like(X), torch.randn(C, device=DEVICE)
                x, y = torch.randn(N, C, device=DEVICE).to(io), torch.empty(N, C, dtype=io, device=DEVICE)
                tri = lambda: update(X, A, x, h0, 5, y)  # noqa: E731
                ref = lambda: reference.update(X, A, x, h0, 5, y)  # noqa: E731
                rows.append({
                    "N": N, "C": C, "io_dtype": str(io).replace("torch.", ""),
                    "triton_us": gpu_us(tri), "torch_us": gpu_us(ref),
                    "triton_host_us": host_us(tri), "torch_host_us": host_us(ref),
                })
    return rows


def time_direct():
    rows = []
    for N in NS:
        for C in CS:
            h = torch.randn(C, 256, device=DEVICE)
            for U in US:
                X = torch.randn(2 * U, N, C, device=DEVICE)
                A = torch.randn_like(X)
                T = reference.toeplitz(h, U).contiguous()
                Xc = torch.randn(N, C, 4 * U, device=DEVICE)
                Ac, S = torch.randn_like(Xc), reference.tile_spectrum(h, U)
                tri = lambda: direct_tile(X, A, h, 0, U, 2 * U, U)  # noqa: E731
                ref = lambda: reference.direct_tile_from_toeplitz(X, A, T, 0, U, 2 * U, U)  # noqa: E731
                fft = lambda: reference.fft_tile(Xc, Ac, S, 0, U, 2 * U, U)  # noqa: E731
                rows.append({
                    "N": N, "C": C, "U": U, "BLOCK_C": common.block_c_direct(C, U),
                    "triton_us": gpu_us(tri), "torch_us": gpu_us(ref), "fft_us": gpu_us(fft),
                    "triton_host_us": host_us(tri), "torch_host_us": host_us(ref), "fft_host_us": host_us(fft),
                })
    return rows


def sweep_block_c():
    rows = []
    N, C = (2, 37) if SMOKE else (8, 2048)
    h = torch.randn(C, 256, device=DEVICE)
    for U in US:
        X = torch.randn(2 * U, N, C, device=DEVICE)
        A = torch.randn_like(X)
        for bc in (16, 32, 64, 128, 256):
            if bc > common.next_pow2(C) or U * bc > 16384:
                continue
            us = gpu_us(lambda: direct_tile(X, A, h, 0, U, 2 * U, U, block_c=bc))
            rows.append({"N": N, "C": C, "U": U, "BLOCK_C": bc, "triton_us": us})
    return rows


def print_table(title, rows, cols):
    print(f"\n{title}")
    print(" ".join(f"{c:>14}" for c in cols))
    for r in rows:
        print(" ".join(_fmt(r.get(c, "")) for c in cols))


def _fmt(v):
    if isinstance(v, float):
        return f"{v:>14.2e}" if 0 < abs(v) < 0.01 else f"{v:>14.2f}"
    return f"{str(v).replace('torch.', ''):>14}"


def main():
    t0 = time.perf_counter()
    info = {
        "device": torch.cuda.get_device_name() if DEVICE == "cuda" else f"cpu (Triton interpreter, {platform.processor()})",
        "torch": torch.__version__, "triton": triton.__version__, "interpret_smoke": SMOKE,
    }
    print(f"device: {info['device']}  torch {info['torch']}  triton {info['triton']}")
    result = {"info": info, "correctness": check_correctness()}
    print_table("correctness (relative error vs torch reference)", result["correctness"], ["kernel", "io_dtype", "U", "m", "rel_err", "ok"])
    bad = [r for r in result["correctness"] if not r["ok"]]
    if bad:
        with open(ARGS.out, "w") as f:
            json.dump(result, f, indent=1)
        sys.exit(f"correctness FAILED for {len(bad)} case(s): {bad}; results in {ARGS.out}")

    result["update"] = time_update()
    for r in result["update"]:
        r["ratio"] = r["torch_us"] / r["triton_us"]
        r["host_ratio"] = r["torch_host_us"] / r["triton_host_us"]
    print_table("update (us; ratio = torch / triton, > 1 means Triton is faster)", result["update"],
                ["N", "C", "io_dtype", "triton_us", "torch_us", "ratio", "triton_host_us", "torch_host_us", "host_ratio"])

    result["direct"] = time_direct()
    for r in result["direct"]:
        r["ratio"] = r["torch_us"] / r["triton_us"]
        r["fft_ratio"] = r["fft_us"] / r["triton_us"]
        r["host_ratio"] = r["torch_host_us"] / r["triton_host_us"]
    print_table("direct tile (us; ratio = torch Toeplitz / triton, fft_ratio = torch FFT tile / triton)", result["direct"],
                ["N", "C", "U", "BLOCK_C", "triton_us", "torch_us", "fft_us", "ratio", "fft_ratio", "triton_host_us", "torch_host_us", "fft_host_us"])

    if ARGS.sweep_block_c:
        result["block_c_sweep"] = sweep_block_c()
        print_table("direct tile channel-block sweep (us)", result["block_c_sweep"], ["N", "C", "U", "BLOCK_C", "triton_us"])

    result["kernels_chosen"] = common.kernels_chosen()
    result["wall_s"] = time.perf_counter() - t0
    with open(ARGS.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nkernels chosen: {len(result['kernels_chosen'])} specialisations; wrote {ARGS.out} in {result['wall_s']:.1f} s")


if __name__ == "__main__":
    main()
