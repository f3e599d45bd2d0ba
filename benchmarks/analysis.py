"""Time lcsm_compile.analyze() on an 18-layer Hyena LM (d_model 864, L = 8192), per pass.

Target: under 10 s on a laptop-class CPU. Run: python benchmarks/analysis.py [--capture dynamo]
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # examples/ lives at the repo root

import lcsm_compile  # noqa: E402
from examples.models.hyena import hyena_lm  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layers", type=int, default=18)
    ap.add_argument("--d-model", type=int, default=864)
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--capture", default="export", choices=["export", "dynamo"])
    args = ap.parse_args()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = hyena_lm(order=2, n_layer=args.layers, vocab=256, d_model=args.d_model, max_len=args.length).eval()
    ids = torch.randint(0, 256, (1, args.length))
    print(f"built {args.layers}-layer Hyena, d_model={args.d_model}, L={args.length} in {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    report = lcsm_compile.analyze(model, (ids,), max_len=args.length, capture=args.capture)
    total = time.perf_counter() - t0
    print(f"{'pass':14s} {'seconds':>8s}")
    for name, _, sec in report.passes:
        print(f"{name:14s} {sec:8.2f}")
    print(f"{'total':14s} {total:8.2f}   (target < 10 s)")
    acc = report.accepted
    t0 = time.perf_counter()
    taps = sum(c.conv.h.shape[1] for c in acc)
    print(f"materialize every filter h at max_len (lazy, done by the decoder): {time.perf_counter() - t0:.2f} s "
          f"({taps} taps in all)")
    print(f"decodable={report.decodable}  accepted: {sum(c.kind == 'long' for c in acc)} long, "
          f"{sum(c.kind == 'short' for c in acc)} short; rejected: {len(report.rejected)}")


if __name__ == "__main__":
    main()
