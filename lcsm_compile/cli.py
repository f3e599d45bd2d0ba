"""`lcsm-compile`: the command line. Each subcommand prints a readable table, or JSON on request."""

import argparse
import json
import sys

from lcsm_compile import demo
from lcsm_compile.errors import LcsmError


def _tune(args):
    from lcsm_compile import tuning

    crossover, rows = tuning.tune(args.device, args.channels, args.max_size, save=not args.no_save)
    if args.json:
        print(json.dumps({"device": args.device, "crossover": crossover, "rows": rows}))
        return
    print(f"{'U':>6} {'direct (us)':>12} {'fft (us)':>10}  faster")
    for U, direct, fft in rows:
        print(f"{U:>6} {direct * 1e6:>12.1f} {fft * 1e6:>10.1f}  {'direct' if direct <= fft else 'fft'}")
    where = "not saved" if args.no_save else f"saved to {tuning.cache_path()}"
    print(f"crossover = {crossover} (largest tile computed directly; {where})")


def _bench(args):
    if args.which == "mixer":
        from lcsm_compile.bench import mixer

        mixer.main(args.rest)


def build_parser():
    parser = argparse.ArgumentParser(prog="lcsm-compile", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("tune", help="calibrate the direct/FFT tile crossover on this machine")
    p.add_argument("--device", default="cpu")
    p.add_argument("--channels", type=int, default=1024)
    p.add_argument("--max-size", type=int, default=256)
    p.add_argument("--no-save", action="store_true", help="print the result without caching it")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_tune)

    p = sub.add_parser("bench", help="run a benchmark (mixer); arguments after it go to the benchmark")
    p.add_argument("which", choices=["mixer"])
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(run=_bench)

    p = sub.add_parser("demo", help="decode a Hyena-style filter bank, verify exactness, time it against the lazy loop")
    demo.add_arguments(p)
    p.set_defaults(run=demo.main)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except LcsmError as e:  # our errors are meant for the user: one clear line, no traceback
        print(f"lcsm-compile: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
