"""The generation benchmark (lcsm_compile.tools.bench.generate) judged against the project's targets (issue 13).

Run: python benchmarks/generate.py [--quick] [--out bench_out/]   (every option of `lcsm-compile bench generate`)
"""

from lcsm_compile.tools.bench import common, generate

NAIVE_OVER_FLASH = 150.0  # 8x256 to 8192 tokens
LAZY_OVER_FLASH = 8.0  # 8x256 at L=32768
FLASH_OVER_FLOOR = 1.25  # every config at L=16384
STEP_OVER_EAGER = 1.25  # a flash step vs one eager forward on one position, every config at its largest L


def targets(results):
    """PASS / MISS per target, n/a where its configuration was not run."""
    def ratio(r, key, method):
        return {"value": r and r["ratios"][key], "estimated": r is not None and r["methods"][method]["estimated"]}

    out = [common.target(f"flash vs lazy >= {LAZY_OVER_FLASH:g}x at L=32768 for 8x256", ok=lambda v: v >= LAZY_OVER_FLASH,
                         **ratio(common.find(results, config="8x256", L=32768), "lazy/flash", "lazy"))]
    configs = list(dict.fromkeys(r["config"] for r in results))
    for c in configs:
        out.append(common.target(f"flash within {FLASH_OVER_FLOOR:g}x of the floor at L=16384 for {c}",
                                 ok=lambda v: v <= FLASH_OVER_FLOOR,
                                 **ratio(common.find(results, config=c, L=16384), "flash/floor", "floor")))
    out.append(common.target(f"generation of 8x256 to 8192 tokens >= {NAIVE_OVER_FLASH:g}x the naive loop",
                             ok=lambda v: v >= NAIVE_OVER_FLASH,
                             **ratio(common.find(results, config="8x256", L=8192), "naive/flash", "naive")))
    for c in configs:
        r = max((r for r in results if r["config"] == c), key=lambda r: r["L"])
        out.append(common.target(f"flash step <= {STEP_OVER_EAGER:g}x one eager forward on one position for {c} "
                                 f"(L={r['L']})", r["ratios"]["step/eager"], lambda v: v <= STEP_OVER_EAGER))
    return out


if __name__ == "__main__":
    raise SystemExit(generate.main(targets=targets))
