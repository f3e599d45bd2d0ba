"""The serving benchmark (lcsm_compile.tools.bench.serve): a stream of requests through one session with
rows joining and leaving, against a loop over requests one at a time and against static batches.

Run: python benchmarks/serve.py [--quick] [--out bench_out/]   (every option of `lcsm-compile bench serve`)
"""

from lcsm_compile.tools.bench import serve

if __name__ == "__main__":
    raise SystemExit(serve.main())
