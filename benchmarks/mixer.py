"""The mixer benchmark (lcsm_compile.tools.bench.mixer) judged against the project's targets (issue 13).

Run: python benchmarks/mixer.py [--quick] [--out bench_out/]   (every option of `lcsm-compile bench mixer`)
"""

from lcsm_compile.tools.bench import common, mixer

LAZY_OVER_FLASH = 80.0  # at C=2048, L=32768
FLASH_OVER_OFFLINE = 2.0  # at C=2048, L=16384 and 32768


def targets(results):
    """PASS / MISS per target, n/a where its configuration was not run."""
    r = common.find(results, C=2048, L=32768)
    out = [common.target(f"flash vs lazy >= {LAZY_OVER_FLASH:g}x at C=2048, L=32768", r and r["ratios"]["lazy/flash"],
                         lambda v: v >= LAZY_OVER_FLASH, estimated=r is not None and r["methods"]["lazy"]["estimated"])]
    for L in (16384, 32768):
        r = common.find(results, C=2048, L=L)
        out.append(common.target(f"flash time / offline FFT <= {FLASH_OVER_OFFLINE:g} at C=2048, L={L}",
                                 r and r["ratios"]["flash/offline"], lambda v: v <= FLASH_OVER_OFFLINE))
    return out


if __name__ == "__main__":
    raise SystemExit(mixer.main(targets=targets))
