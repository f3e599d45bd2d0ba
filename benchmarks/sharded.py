"""The sharded-decode benchmark (lcsm_compile.tools.bench.sharded): per-rank state and step time
against world size, side by side in one run.

Run alone on a quiet machine: python benchmarks/sharded.py [--worlds 1 2 4] [--device cpu|cuda] [--out bench_out/]
"""

from lcsm_compile.tools.bench import sharded

if __name__ == "__main__":
    sharded.main()
