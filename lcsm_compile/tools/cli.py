"""`lcsm-compile`: the command line. Each subcommand prints a readable table, or JSON with --json.

MODEL is `module:factory` or `path.py:factory` (the current directory is on sys.path for module
specs); the factory returns a model or a (model, example_inputs) pair. For a bare model describe
the example inputs: `--input-shape 2,64 --vocab 256` (token ids) or `--input-shape 2,64,16`
(floats, `--dtype`). Errors are one line `lcsm-compile: error: ...` with exit status 2 (1 for an
unexpected failure, 130 when interrupted, 141 quietly when the reader of stdout goes away). With
--json, stdout holds the JSON alone: what the model prints meanwhile goes to stderr.

    detect MODEL            candidates, verdicts and reasons (exit 0 either way unless --strict)
    explain MODEL NAME      source lines and subgraph behind one candidate's verdict
    passes MODEL            every pass: --print-after-all, --print-before P, --stop-after P, --diff, --timing
    schedule MODEL          the step program's layer schedule (--format text|dot|json)
    kernels [MODEL]         Triton specialisations chosen; --dump DIR, --check (TRITON_INTERPRET=1 on CPU)
    verify MODEL            teacher-forced exactness against the float64 model (exit 1 past --tol)
    bench MODEL             greedy generation: eager recompute loop vs the lcsm decoder (--plot)
    bench mixer|generate|serve  the full benchmarks (lcsm_compile.tools.bench.mixer / .generate / .serve), options forwarded
    tune, demo

LCSM_LOGS=detect,passes,schedule,kernels,backend (or all, +debug) logs each area to stderr.
"""

import argparse
import ast
import contextlib
import dataclasses
import difflib
import importlib.util
import json
import os
import re
import sys
import time
import warnings

from lcsm_compile.tools import demo
from lcsm_compile.tools.bench.common import MATPLOTLIB_MISSING, have_matplotlib
from lcsm_compile.errors import LcsmError, NotDecodable
from lcsm_compile.logs import get_logger

from lcsm_compile.pipeline import ANALYSIS_PASSES, PASS_NAMES


class CliError(LcsmError):
    """A usage error found after parsing (unknown candidate, unknown pass, ...): exit 2."""


def _quiet_warnings():
    # torch's own deprecation noise when the decoder deep-copies exported graphs
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)


def _dumps(data):
    return json.dumps(data, indent=2, default=str)


def _print_json(args, data):
    """The --json result, on the real stdout (main sends every other print to stderr meanwhile)."""
    print(_dumps(data), file=args.stdout)


@contextlib.contextmanager
def _stdout_to_stderr(enabled):
    """--json (and schedule --format dot): stdout carries the result alone. What the user's code prints
    meanwhile (a configuration banner while the model is imported, built or captured, a print in
    forward) goes to stderr."""
    if not enabled:
        yield
        return
    with contextlib.redirect_stdout(sys.stderr):
        yield


# -- loading and the shared pipeline ------------------------------------------------------------

def _model_args(p, *, optional=False):
    p.add_argument("model", metavar="MODEL", nargs="?" if optional else None,
                   help="module:factory or path.py:factory; the factory returns a model or (model, example_inputs)")
    g = p.add_argument_group("model inputs (needed when the factory returns a bare model)")
    g.add_argument("--input-shape", metavar="B,L[,D...]", help="example input shape, the sequence on dim 1 (token ids when the "
                   "model has an nn.Embedding and neither --vocab nor --dtype is given, else floats)")
    g.add_argument("--vocab", type=int, help="token ids are drawn from [0, VOCAB)")
    g.add_argument("--dtype", choices=["float32", "float64", "float16", "bfloat16", "int64", "int32"],
                   help="example input dtype (default float32, or int64 with --vocab)")
    g.add_argument("--max-len", type=int, help="longest sequence served (default: model.max_len, else the example length)")
    g.add_argument("--arg", action="append", default=[], metavar="KEY=VALUE", help="keyword argument for the factory (repeatable)")
    g.add_argument("--seed", type=int, default=0, help="seed of generated inputs")


def _load(args):
    from lcsm_compile.tools.loading import load

    start = time.perf_counter()
    loaded = load(args.model, input_shape=args.input_shape, vocab=args.vocab, dtype=args.dtype,
                  max_len=args.max_len, kwargs=args.arg, seed=args.seed)
    x = loaded.inputs[0]
    get_logger("passes").info("loaded %s: %s, input %s %s, max_len %s (%.2f s)", args.model, type(loaded.model).__name__,
                              list(x.shape), str(x.dtype).replace("torch.", ""), loaded.max_len, time.perf_counter() - start)
    return loaded


def _analyze(loaded, capture="export"):
    from lcsm_compile.analysis import analyze

    report = analyze(loaded.model, loaded.inputs, max_len=loaded.max_len, capture=capture)
    plog, dlog = get_logger("passes"), get_logger("detect")
    for name, dump, seconds in report.passes:
        plog.info("pass %-13s %8.3f s  (%d dump lines)", name, seconds, dump.count("\n") + 1 if dump else 0)
        plog.debug("after %s:\n%s", name, dump)
    for c in report.candidates:
        dlog.info("%s: %s %s %s%s%s", c.name, c.spelling, c.kind, c.verdict.value,
                  f" {c.reason.value}" if c.reason else "", f" at {c.module_path}" if c.module_path else "")
        dlog.debug("%s: %s | %s", c.name, c.explanation, c.source)
    dlog.info("decodable=%s (%d accepted, %d rejected)", report.decodable, len(report.accepted), len(report.rejected))
    return report


def _optimize(loaded, **kwargs):
    from lcsm_compile.decoder import optimize

    start = time.perf_counter()
    decoder = optimize(loaded.model, loaded.inputs, max_len=loaded.max_len, **kwargs)
    get_logger("passes").info("optimized in %.3f s (analysis, decode rewrite, schedule, validation)", time.perf_counter() - start)
    return decoder


def _long_sites(report):
    return [c for c in report.accepted if c.kind == "long"]


# -- detect -------------------------------------------------------------------------------------

def _detect(args):
    report = _analyze(_load(args), args.capture)
    if args.json:
        _print_json(args, {"model": args.model, **json.loads(report.to_json())})
    else:
        print(report.table())
    return 1 if args.strict and not report.decodable else 0


# -- explain ------------------------------------------------------------------------------------

_TORCH_DIR = os.path.dirname(importlib.util.find_spec("torch").origin) + os.sep


def _ancestors(node, stop=()):
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        for a in n.all_input_nodes:
            if a not in seen and a not in stop:
                seen.add(a)
                todo.append(a)
    return seen


def _user_frames(node):
    """[(file, line, function, code)] of the stack trace outside torch, innermost last."""
    lines = (node.meta.get("stack_trace") or "").splitlines()
    frames = []
    for i, ln in enumerate(lines):
        m = re.match(r'\s*File "(.+)", line (\d+), in (\S+)', ln)
        if m:
            code = lines[i + 1].strip() if i + 1 < len(lines) and not lines[i + 1].strip().startswith("File ") else ""
            frames.append((m.group(1), int(m.group(2)), m.group(3), code))
    return [f for f in frames if not (f[0].startswith(_TORCH_DIR) or f[0].startswith("torch" + os.sep))]


def _short_path(path):
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return path
    return path if rel.startswith("..") else rel


def _module_stack(node):
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for path, cls in stack.values():
        path = path.replace("L['self'].", "").replace("L['self']", "")
        cls = cls if isinstance(cls, str) else getattr(cls, "__qualname__", str(cls))
        if path:
            out.append({"path": path, "class": cls.rsplit(".", 1)[-1]})
    return out


def _node_text(node):
    def arg(a):
        if hasattr(a, "name") and hasattr(a, "op"):
            return "%" + a.name
        if isinstance(a, (list, tuple)):
            return "[" + ", ".join(arg(x) for x in a) + "]"
        return str(a)

    target = node.target if node.op != "call_function" else str(getattr(node.target, "__name__", node.target))
    if node.op == "call_function" and hasattr(node.target, "_overloadpacket"):
        target = str(node.target)
    args = ", ".join([arg(a) for a in node.args] + [f"{k}={arg(v)}" for k, v in node.kwargs.items()])
    text = f"{node.op}" if node.op in ("placeholder", "output") else f"{target}({args})"
    if node.op == "get_attr":
        text = f"get_attr {node.target}"
    val = node.meta.get("val")
    shape = ""
    if hasattr(val, "shape") and hasattr(val, "dtype"):
        shape = f"[{', '.join(str(d) for d in val.shape)}] {str(val.dtype).replace('torch.', '')}"
    return text, shape


def _explain_data(report, cand):
    gm = getattr(report.captured, "gm", None)
    data = {"name": cand.name, **cand.to_dict(), "decodable": report.decodable, "module_stack": [], "source_lines": [],
            "stack_trace": "", "subgraph": []}
    if gm is None or cand.name == "model":  # a capture failure, or the whole-model safety net
        data["note"] = ("no graph: the model could not be captured" if gm is None else
                        "whole-model check (causality under perturbation of the future, prefix stability): "
                        + "; ".join(f"{k} {'passed' if v['passed'] else 'FAILED'} (rel err {v['rel_err']:.1e})"
                                    for k, v in report.safety.items()))
        return data
    nodes = {n.name: n for n in gm.graph.nodes}
    node = nodes.get(cand.name)
    roles = {}
    k = cand.conv
    ends = None
    if k is not None:
        ends = (k.input, k.output)
        roles.update({n.name: "filter" for n in k.filter_nodes})
    elif cand.input in nodes and cand.output in nodes:  # a rejected convolution: its match's ends
        ends = (nodes[cand.input], nodes[cand.output])
    if ends is not None:  # everything the output needs that the input does not: data path + filter
        inp, out = ends
        region = ({out} | _ancestors(out)) - _ancestors(inp)
        data_path = {n for n in region if n is inp or inp in _ancestors(n)}
        roles.update({n.name: "filter" for n in region - data_path if n.op != "placeholder" and n.name not in roles})
        roles[inp.name], roles[out.name] = "input", "output"
    elif node is not None:  # a time-mixing op: its ancestors inside its own module, and the op
        path = cand.module_path
        inside = lambda n: bool(_module_stack(n)) and _module_stack(n)[-1]["path"].startswith(path)  # noqa: E731
        region = {node} | {a for a in _ancestors(node) if path and inside(a)} | set(node.all_input_nodes)
    else:
        region = set()
    if node is not None:
        roles[node.name] = "conv" if k is not None or ends is not None else "op"
        data["module_stack"] = _module_stack(node)
        data["stack_trace"] = (node.meta.get("stack_trace") or "").rstrip()
    if cand.offending and cand.offending in nodes:
        region.add(nodes[cand.offending])
        roles[cand.offending] = "offending"
    seen_src = set()
    for n in gm.graph.nodes:
        if n not in region:
            continue
        frames = _user_frames(n) if n.op == "call_function" else []
        where = ""
        if frames:
            f, line, fn, code = frames[-1]
            where = f"{_short_path(f)}:{line}"
            if (f, line) not in seen_src:
                seen_src.add((f, line))
                data["source_lines"].append({"file": _short_path(f), "line": line, "function": fn, "code": code})
        text, shape = _node_text(n)
        data["subgraph"].append({"name": n.name, "role": roles.get(n.name, ""), "op": n.op, "code": text,
                                 "shape": shape, "source": where})
    return data


_ROLE_MARK = {"input": ">", "output": "<", "conv": "*", "op": "*", "filter": "f", "offending": "!"}


def _explain_text(d):
    out = [f"{d['name']}: {d['spelling']} ({d['kind']}) {d['verdict']}" + (f" {d['reason']}" if d["reason"] else "")]
    if d["module_stack"]:
        out.append("  module: " + " > ".join(f"{m['path']} ({m['class']})" for m in d["module_stack"]))
    if d["explanation"]:
        out.append(f"  why: {d['explanation']}")
    if d.get("offending"):
        out.append(f"  offending node: %{d['offending']}")
    if d.get("note"):
        out.append(f"  {d['note']}")
    if d["source_lines"]:
        out.append("source lines (innermost user frame of each node, in graph order):")
        for s in d["source_lines"]:
            out.append(f"  {s['file']}:{s['line']} in {s['function']}")
            if s["code"]:
                out.append(f"      {s['code']}")
    if d["subgraph"]:
        out.append(f"subgraph: {len(d['subgraph'])} nodes  (> input, < output, * the op, f filter, ! offending)")
        w = min(24, max(len(n["name"]) for n in d["subgraph"]))
        cw = min(72, max(len(n["code"]) for n in d["subgraph"]))
        sw = max(len(n["shape"]) for n in d["subgraph"])
        cut = lambda s, k: s if len(s) <= k else s[: k - 3] + "..."  # noqa: E731
        for n in d["subgraph"]:
            out.append(f"  {_ROLE_MARK.get(n['role'], ' ')} %{cut(n['name'], w):<{w}} = {cut(n['code'], cw):<{cw}}  "
                       f"{n['shape']:<{sw}}  {n['source']}".rstrip())
    return "\n".join(out)


def _explain(args):
    report = _analyze(_load(args), args.capture)
    by_name = {c.name: c for c in report.candidates}
    if args.name not in by_name:
        raise CliError(f"no candidate named {args.name!r}; valid names: {', '.join(by_name) or '(none)'}")
    data = _explain_data(report, by_name[args.name])
    if args.json:
        _print_json(args, {"model": args.model, **data})
    else:
        print(_explain_text(data))
    return 0


# -- passes -------------------------------------------------------------------------------------

def _check_pass(name, flag):
    if name is not None and name not in PASS_NAMES:
        raise CliError(f"{flag}: unknown pass {name!r}; passes: {', '.join(PASS_NAMES)}")


def _passes(args):
    for name, flag in [(args.stop_after, "--stop-after")] + [(p, "--print-before") for p in args.print_before] + \
            [(p, "--print-after") for p in args.print_after]:
        _check_pass(name, flag)
    loaded = _load(args)
    from lcsm_compile import pipeline
    from lcsm_compile.analysis import check_args, quiet

    inputs, max_len = check_args(loaded.model, loaded.inputs, loaded.max_len, args.capture)
    with quiet():
        ctx = pipeline.run(pipeline.Context(loaded.model, inputs, max_len, args.capture), stop_after=args.stop_after)
    report = ctx.report
    entries, notes = list(ctx.passes), list(report.notes)
    log = get_logger("passes")
    for name, dump, seconds in entries:
        log.info("pass %-18s %8.3f s  (%d dump lines)", name, seconds, dump.count("\n") + 1 if dump else 0)
    ran = [e[0] for e in entries]
    stop = args.stop_after
    if stop is not None and stop not in ran:
        notes.append(f"--stop-after {stop}: that pass did not run"
                     + ("" if report.decodable or stop in ANALYSIS_PASSES else " (the model is not decodable; see `lcsm-compile detect`)"))
    elif stop is None and not report.decodable and ran and ran[-1] in ANALYSIS_PASSES:
        notes.append("decode passes: skipped (the model is not decodable; see `lcsm-compile detect`)")
    show_dumps = args.print_after_all or args.print_before or args.print_after or args.diff
    before = repr(loaded.model)  # what the first pass receives
    prev = {}
    for i, (name, _, _) in enumerate(entries):
        prev[name] = entries[i - 1][1] if i else before
    total = sum(s for _, _, s in entries)
    if args.json:
        data = {"model": args.model, "decodable": report.decodable, "stopped_after": stop,
                "total_seconds": round(total, 4), "notes": notes, "passes": []}
        for name, dump, seconds in entries:
            e = {"name": name, "seconds": round(seconds, 4), "dump_lines": dump.count("\n") + 1 if dump else 0}
            if args.print_after_all or name in args.print_after:
                e["dump"] = dump
            if name in args.print_before:
                e["before"] = prev[name]
            if args.diff:
                e["diff"] = _diff(prev[name], dump, entries, name)
            data["passes"].append(e)
        _print_json(args, data)
        return 0

    out = []
    for name, dump, seconds in entries:
        if name in args.print_before:
            out += [f"=== before {name} ===", prev[name].rstrip()]
        if args.diff:
            out += [f"=== diff {name} ===", _diff(prev[name], dump, entries, name).rstrip() or "(no change)"]
        if args.print_after_all or name in args.print_after:
            out += [f"=== after {name} ({seconds:.3f} s) ===", dump.rstrip()]
    if not show_dumps or args.timing:
        if out:
            out.append("")
        out.append(f"passes of {args.model}: decodable={report.decodable}")
        head = f"{'pass':<16}{'dump lines':>11}" + (f"{'seconds':>10}{'share':>8}" if args.timing else "")
        out += [head, "-" * len(head)]
        for name, dump, seconds in entries:
            row = f"{name:<16}{(dump.count(chr(10)) + 1 if dump else 0):>11}"
            if args.timing:
                row += f"{seconds:>10.3f}{100 * seconds / total if total else 0:>7.1f}%"
            out.append(row)
        if args.timing:
            out.append(f"{'total':<16}{'':>11}{total:>10.3f}")
    out += [f"note: {n}" for n in notes]
    print("\n".join(out))
    return 0


def _diff(before, after, entries, name):
    names = [e[0] for e in entries]
    i = names.index(name)
    a = f"after {names[i - 1]}" if i else "model"
    return "".join(difflib.unified_diff(before.splitlines(True), after.splitlines(True), a, f"after {name}", n=1))


# -- schedule -----------------------------------------------------------------------------------

def _schedule(args):
    loaded = _load(args)
    decoder = _optimize(loaded, conv=args.conv, latency=args.latency)
    sched = getattr(decoder, "schedule", None)
    if sched is None:
        raise CliError("this build's Decoder has no layer schedule (decoder.schedule)")
    data = sched.to_json()
    log = get_logger("schedule")
    log.info("%d levels, critical path %s, %d tile groups", len(data["levels"]), " -> ".join(data["critical_path"]),
             len(data["tile_groups"]))
    plan = rank_sched = None
    if args.tp is not None:  # what optimize(tp=group) would do at this world size: rank 0's programs and schedule
        from lcsm_compile import pipeline

        options = {"conv": args.conv, "latency": args.latency, "shard_preview": args.tp}
        lowered = pipeline.lower(decoder.report, options, loaded.inputs)
        plan, rank_sched = lowered.shard_plan, lowered.schedule
    fmt = "json" if args.json else args.format
    if fmt == "json":
        extra = {"shard_plan": plan.to_json(), "rank_schedule": rank_sched.to_json()} if plan else {}
        _print_json(args, {"model": args.model, **data, **extra})
    elif fmt == "dot":
        print(sched.to_dot(), file=args.stdout)
    else:
        print(sched.table())
        if plan is not None:
            print(plan.table({i: s.name for i, s in enumerate(decoder.sites)}))
            print(f"rank 0 of {args.tp}: " + rank_sched.table())
    return 0


# -- kernels ------------------------------------------------------------------------------------

def kernel_plan(sites, *, max_len, crossover, state_dtype, bank_channels=None):
    """The Triton specialisations a CUDA decode launches: the red cell once per long-conv site
    (channel block from the site's width), the direct tile per size kernel_for assigns it, over the
    bank. sites: [(name, channels, io dtype name)]. Returns (specs, fft tile sizes)."""
    from lcsm_compile.kernels.registry import KERNELS, kernel_for
    from lcsm_compile.schedule import tile_sizes

    C = bank_channels or sum(c for _, c, _ in sites)
    update = KERNELS["update"]
    specs = {}
    for name, width, io in sites:
        ce = update.specialise(width)
        spec = specs.setdefault(("update", tuple(ce.items()), io),
                                {"kernel": "update", "constexprs": ce, "state_dtype": state_dtype, "io_dtype": io,
                                 "channels": width, "sites": [], "when": update.when})
        spec["sites"].append(name)
        spec["channels"] = max(spec["channels"], width)
    ffts = []
    for U in tile_sizes(0, max_len):
        kernel = KERNELS[kernel_for(U, crossover)]
        if kernel.triton is None:
            ffts.append(U)
            continue
        specs[(kernel.name, U)] = {"kernel": kernel.name, "constexprs": kernel.specialise(C, U),
                                   "state_dtype": state_dtype, "io_dtype": None, "channels": C,
                                   "sites": [n for n, _, _ in sites], "when": kernel.when.format(U=U, U2=2 * U)}
    return list(specs.values()), ffts


def _spec_filename(spec):
    ce = "_".join(f"{k}{v}" for k, v in spec["constexprs"].items())
    io = f"_io-{spec['io_dtype']}" if spec.get("io_dtype") else ""
    return f"{spec['kernel']}_{ce}_{spec['state_dtype']}{io}.py"


def _kernel_source(kernel):
    """(path, first line, source with decorator) of a @triton.jit function, read from its file
    without importing triton."""
    from lcsm_compile.kernels.registry import KERNELS

    module, func = KERNELS[kernel].source()
    path = importlib.util.find_spec(module).origin
    with open(path) as f:
        text = f.read()
    for node in ast.parse(text).body:
        if isinstance(node, ast.FunctionDef) and node.name == func:
            start = min([d.lineno for d in node.decorator_list] + [node.lineno])
            lines = text.splitlines()[start - 1 : node.end_lineno]
            return path, start, "\n".join(lines)
    raise CliError(f"kernel source {module}.{func} not found")


def dump_kernels(specs, folder):
    os.makedirs(folder, exist_ok=True)
    written = []
    for spec in specs:
        path, line, src = _kernel_source(spec["kernel"])
        constexprs = ", ".join(f"{k}={v}" for k, v in spec["constexprs"].items())
        text = (f'"""lcsm_compile Triton kernel `{spec["kernel"]}`, specialisation {constexprs}\n'
                f"state dtype {spec['state_dtype']}, io dtype {spec.get('io_dtype') or '-'}, {spec['channels']} channels\n"
                f"{spec['when']}\nsource: {path}:{line}\n\"\"\"\n\n"
                "import triton\nimport triton.language as tl\n\n"
                f"SPECIALISATION = {json.dumps({k: spec[k] for k in ('kernel', 'constexprs', 'state_dtype', 'io_dtype', 'channels')})}\n\n\n"
                f"{src}\n")
        out = os.path.join(folder, _spec_filename(spec))
        with open(out, "w") as f:
            f.write(text)
        written.append(out)
    return written


def _kernels(args):
    from lcsm_compile.engine import state_dtype_for
    from lcsm_compile.tools.loading import DTYPES
    from lcsm_compile import tuning

    import torch

    from lcsm_compile.kernels.triton_common import TRITON_MISSING

    if args.check and importlib.util.find_spec("triton") is None:  # before loading anything
        raise CliError(f"--check: {TRITON_MISSING}")
    cuda = torch.cuda.is_available()
    crossover = args.crossover or (tuning.crossover_for("cuda") if cuda else tuning.DEFAULTS["cuda"])
    if args.model:
        loaded = _load(args)
        report = _analyze(loaded)
        if not report.decodable:
            raise NotDecodable(report)
        sites = [(c.name, int(c.channels), c.dtype or "float32") for c in _long_sites(report)]
        max_len, what = report.capture.max_len, args.model
    else:
        sites = [("conv", args.channels, args.io_dtype)]
        max_len, what = args.max_len or 4096, "--channels"
    if not sites:
        raise CliError(f"{what} has no long convolution: no tile kernels to choose")
    state = str(state_dtype_for(DTYPES[sites[0][2]])).replace("torch.", "")
    specs, ffts = kernel_plan(sites, max_len=max_len, crossover=crossover, state_dtype=state)
    log = get_logger("kernels")
    for s in specs:
        log.info("chosen %s %s state=%s io=%s C=%d", s["kernel"], s["constexprs"], s["state_dtype"], s["io_dtype"], s["channels"])
    data = {"model": args.model, "channels": sum(c for _, c, _ in sites), "max_len": max_len, "crossover": crossover,
            "state_dtype": state, "kernels": specs, "fft_tile_sizes": ffts, "cuda": cuda,
            "note": ("the decoder launches these on CUDA tensors" if cuda else
                     "no CUDA here: the decoder runs the torch kernels; these are what a CUDA decode launches")}
    if args.dump:
        data["dumped"] = dump_kernels(specs, args.dump)
    failed = False
    if args.check:
        from lcsm_compile import verify

        res = verify.check_kernels(specs)
        data["check_device"], data["launched"] = res["device"], res["launched"]
        for spec, r in zip(specs, res["results"]):
            spec.update({k: r[k] for k in ("rel_err", "tol", "passed", "seconds", "error") if k in r})
            log.info("check %s %s: rel err %s", spec["kernel"], spec["constexprs"], spec["rel_err"])
        failed = not all(s["passed"] for s in specs)
    if args.json:
        _print_json(args, data)
        return 1 if failed else 0
    out = [f"Triton specialisations for {what}: {len(sites)} long conv(s), bank of {data['channels']} channels, max_len {max_len}, "
           f"crossover {crossover} (direct tiles U <= {crossover}), state {state}"]
    head = f"{'kernel':<12} {'constexprs':<18} {'state':<8} {'io':<9} {'C':>5}" + \
           (f" {'rel err':>9} {'tol':>7}  ok" if args.check else "") + "  when"
    out += [head, "-" * len(head)]
    for s in specs:
        ce = ", ".join(f"{k}={v}" for k, v in s["constexprs"].items())
        row = f"{s['kernel']:<12} {ce:<18} {s['state_dtype']:<8} {s['io_dtype'] or '-':<9} {s['channels']:>5}"
        if args.check:
            err = "error" if s.get("rel_err") is None else f"{s['rel_err']:.1e}"
            row += f" {err:>9} {s['tol'] or 0:>7.0e}  {'yes' if s['passed'] else 'NO'}"
        out.append(row + f"  {s['when']}")
    if ffts:
        out.append(f"FFT tiles U in {ffts} run torch.fft on the channel-major state (no Triton kernel)")
    out.append(f"note: {data['note']}")
    if args.check:
        out.append(f"checked against lcsm_compile.kernels.reference on {data['check_device']}")
        out += [f"error in {s['kernel']} {s['constexprs']}: {s['error']}" for s in specs if s.get("error")]
    if args.dump:
        out.append(f"wrote {len(data['dumped'])} kernel sources to {args.dump}")
    print("\n".join(out))
    return 1 if failed else 0


# -- verify -------------------------------------------------------------------------------------

def _progress(args):
    if args.json or args.no_progress:
        return None
    from tqdm import tqdm

    return lambda it, desc: tqdm(it, desc=desc, unit="pos", leave=False)


def _ints(text, flag):
    try:
        return tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise CliError(f"{flag}: expected comma-separated integers, got {text!r}") from None


def _verify(args):
    from lcsm_compile import verify
    from lcsm_compile.tools.loading import random_inputs

    loaded = _load(args)
    decoder = _optimize(loaded)
    length = args.length or loaded.length
    if length > decoder.max_len:
        raise CliError(f"--length {length} exceeds the decoder's max_len {decoder.max_len}")
    inputs = random_inputs(loaded, length, seed=args.seed + 1)  # fresh inputs, not the example ones
    prompt_lens = _ints(args.prompt_lens, "--prompt-lens") if args.prompt_lens else verify.default_prompt_lens(length)
    bad = [p for p in prompt_lens if not 1 <= p <= length]
    if bad:
        raise CliError(f"--prompt-lens: {bad} outside [1, {length}]")
    res = verify.teacher_forced(loaded.model, decoder, inputs, prompt_lens, tol=args.tol, progress=_progress(args))
    if args.json:
        _print_json(args, {"model": args.model, "max_len": decoder.max_len, **res})
    else:
        tol = f"tol {res['tol']:.2g}" + ("" if res["model_rel_err"] is None else
                                         f" (the model itself is off by {res['model_rel_err']:.2e})")
        out = [f"teacher-forced decoding of {args.model}: {length} positions, batch {inputs[0].shape[0]}, "
               f"reference = the model in float64, {tol}",
               f"{'prompt':>7} {'steps':>6} {'max rel err':>12} {'at':>5} {'prefill err':>12} {'step err':>10} {'seconds':>8}"]
        for r in res["runs"]:
            step = "-" if r["step_max_rel_err"] is None else f"{r['step_max_rel_err']:.2e}"
            out.append(f"{r['prompt_len']:>7} {r['steps']:>6} {r['max_rel_err']:>12.2e} {r['worst_position']:>5} "
                       f"{r['prefill_max_rel_err']:>12.2e} {step:>10} {r['seconds']:>8.3f}")
        served = "" if length == decoder.max_len else f" of the {decoder.max_len} served (--length sets more)"
        out.append(f"{'PASS' if res['passed'] else 'FAIL'}: max relative error {res['max_rel_err']:.2e} "
                   f"{'<=' if res['passed'] else '>'} {res['tol']:.2g}, checked positions 0..{length - 1}{served}")
        print("\n".join(out))
    return 0 if res["passed"] else 1


# -- bench --------------------------------------------------------------------------------------

BENCHMARKS = {"mixer": "lcsm_compile.tools.bench.mixer", "generate": "lcsm_compile.tools.bench.generate",
              "serve": "lcsm_compile.tools.bench.serve"}


def _bench_forward(which, rest):
    """`bench mixer|generate|serve ...`: the benchmark module's own main(argv)."""
    import importlib

    rc = importlib.import_module(BENCHMARKS[which]).main(rest)
    return rc if isinstance(rc, int) else 0


def _decode(session, x, P, n, pick, desc, show):
    """prefill(x[:, :P]) then n steps on `session`, each step's input the previous output's pick
    (greedy) or, when pick is None, the next position of x (teacher forcing). Returns (prefill
    seconds, per-step seconds, the inputs fed after the prompt)."""
    from tqdm import tqdm

    start = time.perf_counter()
    out = session.prefill(x[:, :P])
    prefill_s = time.perf_counter() - start
    nxt = x[:, P : P + 1] if pick is None else pick(out)
    fed, times = [nxt], []
    for t in tqdm(range(P + 1, P + 1 + n), desc=desc, unit="tok", leave=False, disable=not show):
        start = time.perf_counter()
        out = session.step(nxt)
        nxt = x[:, t : t + 1] if pick is None else pick(out)
        times.append(time.perf_counter() - start)
        fed.append(nxt)
    return prefill_s, times, fed


def _bench(args):
    import torch

    from lcsm_compile.generation import NaiveSession

    if args.plot and not have_matplotlib():  # before the run, not after it
        raise CliError(f"--plot: {MATPLOTLIB_MISSING}")
    loaded = _load(args)
    decoder = _optimize(loaded, compile=args.compile)
    length = args.length or min(decoder.max_len, 256)
    P = args.prompt
    if not 1 <= P < length <= decoder.max_len:
        raise CliError(f"expected 1 <= --prompt ({P}) < --length ({length}) <= max_len ({decoder.max_len})")
    from lcsm_compile.tools.loading import random_inputs

    x = random_inputs(loaded, length, seed=args.seed + 1)[0]
    compile_s = None
    if args.compile:  # compile the step on a throwaway session so the timed steps measure decoding only
        start = time.perf_counter()
        with torch.no_grad():
            warm = decoder.session()
            warm.prefill(x[:, :P])
            warm.step(x[:, P : P + 1])
        compile_s = time.perf_counter() - start
    greedy = loaded.tokens
    show = not (args.json or args.no_progress)

    def pick(out):  # greedy: the next input is the argmax of the last position's output
        last = out if isinstance(out, torch.Tensor) else torch.utils._pytree.tree_leaves(out)[0]
        return last[:, -1].argmax(-1, keepdim=True).to(x.dtype)

    pick = pick if greedy else None  # teacher forcing: the next input is the next position of x
    n = length - P - 1
    with torch.no_grad():
        # eager: the model recomputed on the whole prefix at every position
        prefill_naive, naive_t, naive_tokens = _decode(NaiveSession(loaded.model), x, P, n, pick, "eager recompute", show)
        prefill_lcsm, lcsm_t, lcsm_tokens = _decode(decoder.session(), x, P, n, pick, "lcsm decoder", show)

    match = bool(torch.equal(torch.cat(naive_tokens, 1), torch.cat(lcsm_tokens, 1))) if greedy else None
    n = len(naive_t)
    rows = {"eager_recompute": (prefill_naive, naive_t), "lcsm": (prefill_lcsm, lcsm_t)}
    data = {"model": args.model, "mode": "greedy" if greedy else "teacher-forced", "prompt": P, "length": length,
            "batch": int(x.shape[0]), "steps": n, "threads": torch.get_num_threads(), "tokens_match": match,
            "compiled_step": args.compile, "compile_s": None if compile_s is None else round(compile_s, 3)}
    for k, (pf, ts) in rows.items():
        total = pf + sum(ts)
        data[k] = {"prefill_s": round(pf, 5), "steps_s": round(sum(ts), 5), "total_s": round(total, 5),
                   "ms_per_token": round(1e3 * sum(ts) / max(n, 1), 4), "tokens_per_s": round(n / max(sum(ts), 1e-12), 2),
                   "last_token_ms": round(1e3 * ts[-1], 4) if ts else None}
    data["speedup_steps"] = round(sum(naive_t) / max(sum(lcsm_t), 1e-12), 3)
    plot_error = None
    if args.plot:  # a failed plot is reported after the results, which are printed either way
        try:
            _plot(args.plot, P, rows, args.model)
        except Exception as e:  # noqa: BLE001 - any failure to write the file
            plot_error = f"--plot {args.plot}: {type(e).__name__}: {_one_line(e)} (the results above are complete)"
        data["plot"] = None if plot_error else args.plot
    if args.json:
        _print_json(args, data)
        return _after_plot(plot_error)
    out = [f"greedy generation of {args.model}: prompt {P}, {n} steps to {length}, batch {data['batch']}, "
           f"{data['threads']} threads" if greedy else
           f"teacher-forced decoding of {args.model}: prompt {P}, {n} steps to {length}, batch {data['batch']}",
           f"{'method':<16} {'prefill s':>10} {'steps s':>9} {'ms/token':>9} {'tokens/s':>9} {'last ms':>8}"]
    for k in rows:
        d = data[k]
        out.append(f"{k:<16} {d['prefill_s']:>10.4f} {d['steps_s']:>9.3f} {d['ms_per_token']:>9.3f} "
                   f"{d['tokens_per_s']:>9.1f} {d['last_token_ms'] or 0:>8.3f}")
    if compile_s is not None:
        out.append(f"lcsm step program compiled by inductor beforehand in {compile_s:.1f} s (not in the timings)")
    out.append(f"speedup (steps): {data['speedup_steps']:.2f}x" +
               (f"; same tokens: {'yes' if match else 'NO'}" if greedy else ""))
    if args.plot and not plot_error:
        out.append(f"plot written to {args.plot}")
    print("\n".join(out))
    return _after_plot(plot_error)


def _after_plot(error):
    """Exit status once the results are out: 0, or 1 with the plot's error on stderr."""
    if error is None:
        return 0
    print(f"lcsm-compile: error: {error}", file=sys.stderr)
    return 1


def _plot(path, P, rows, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, (_, ts) in rows.items():
        ax.plot(range(P + 1, P + 1 + len(ts)), [1e3 * t for t in ts], label=name, linewidth=1)
    ax.set_xlabel("position")
    ax.set_ylabel("ms per token")
    ax.set_yscale("log")
    ax.set_title(f"per-token latency: {title}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- tune ---------------------------------------------------------------------------------------

def _tune(args):
    from lcsm_compile import tuning
    from lcsm_compile.tools import tune

    crossover, rows, costs = tune.tune(args.device, args.channels, args.max_size, save=not args.no_save)
    if args.json:
        _print_json(args, {"device": args.device, "crossover": crossover, "rows": rows,
                           "costs": dataclasses.asdict(costs)})
        return
    print(f"{'U':>6} {'direct (us)':>12} {'fft (us)':>10}  faster")
    for U, direct, fft in rows:
        print(f"{U:>6} {direct * 1e6:>12.1f} {fft * 1e6:>10.1f}  {'direct' if direct <= fft else 'fft'}")
    where = "not saved" if args.no_save else f"saved to {tuning.cache_path()}"
    print(f"crossover = {crossover} (largest tile computed directly; {where})")
    print(f"costs: transforms {costs.fft_flops_s / 1e9:.1f} GFlop/s, multiply-adds {costs.mac_flops_s / 1e9:.1f} "
          f"GFlop/s, direct lags {costs.direct_flops_s / 1e9:.1f} GFlop/s, {costs.call_s * 1e6:.1f} us per call")
    print(f"per step: a red cell {costs.red_cell_s * 1e6:.1f} us, the tile engine {costs.advance_s * 1e6:.1f} us "
          f"besides its tiles, a recurrent step {costs.recurrent_s * 1e6:.1f} us "
          f"+ {costs.recurrent_channel_s * 1e9:.2f} ns per channel + {costs.mode_s * 1e9:.2f} ns per mode and channel")


# -- parser -------------------------------------------------------------------------------------

def build_parser():
    parser = argparse.ArgumentParser(prog="lcsm-compile", description=__doc__.split("\n")[0],
                                     epilog="`lcsm-compile bench mixer|generate|serve --help`: the benchmarks' options")
    parser.add_argument("--traceback", action="store_true", help="print the traceback of an unexpected error")
    sub = parser.add_subparsers(dest="command", required=True)
    capture = dict(choices=["export", "dynamo"], default="export", help="capture level of the analysis")

    p = sub.add_parser("detect", help="candidates, verdicts and reasons of the legality analysis")
    _model_args(p)
    p.add_argument("--capture", **capture)
    p.add_argument("--strict", action="store_true", help="exit 1 when the model is not decodable")
    p.add_argument("--json", action="store_true", help="the Report as JSON (top-level `decodable`)")
    p.set_defaults(run=_detect)

    p = sub.add_parser("explain", help="source lines and subgraph behind one candidate's verdict")
    _model_args(p)
    p.add_argument("name", metavar="NAME", help="candidate name, as `detect` lists it")
    p.add_argument("--capture", **capture)
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_explain)

    p = sub.add_parser("passes", help="run the passes and print their dumps, diffs and timings")
    _model_args(p)
    p.add_argument("--capture", **capture)
    p.add_argument("--print-after-all", action="store_true", help="each pass's dump")
    p.add_argument("--print-after", action="append", default=[], metavar="PASS")
    p.add_argument("--print-before", action="append", default=[], metavar="PASS", help="the input of PASS")
    p.add_argument("--stop-after", metavar="PASS", help=f"one of {', '.join(PASS_NAMES)}")
    p.add_argument("--diff", action="store_true", help="unified diff of consecutive pass dumps")
    p.add_argument("--timing", action="store_true", help="seconds per pass")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_passes)

    p = sub.add_parser("schedule", help="layer schedule of the step program: levels, critical path, tile groups")
    _model_args(p)
    p.add_argument("--conv", choices=["flash", "partitioned"], default="flash",
                   help="the bank whose schedule to print: the paper's tiling, or frequency-domain delay lines")
    p.add_argument("--latency", action="store_true", help="with --conv partitioned: its bounded-latency plan")
    p.add_argument("--format", choices=["text", "dot", "json"], default="text")
    p.add_argument("--json", action="store_true", help="same as --format json")
    p.add_argument("--tp", type=int, metavar="WORLD", help="also the shard plan optimize(tp=...) would follow at this world size (passes/shard_plan.py) and the schedule of rank 0's programs")
    p.set_defaults(run=_schedule)

    p = sub.add_parser("kernels", help="Triton specialisations chosen for a model (or a bank); --dump, --check")
    _model_args(p, optional=True)
    p.add_argument("--channels", type=int, default=512, help="without MODEL: channels of the bank")
    p.add_argument("--io-dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"],
                   help="without MODEL: activation dtype")
    p.add_argument("--crossover", type=int, help="largest direct tile (default: the CUDA tuned value or default)")
    p.add_argument("--dump", metavar="DIR", help="write each specialisation's Triton source to DIR")
    p.add_argument("--check", action="store_true", help="run each against its torch reference (TRITON_INTERPRET=1 without CUDA)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_kernels)

    p = sub.add_parser("verify", help="teacher-forced exactness of the decoder against the float64 model")
    _model_args(p)
    p.add_argument("--length", type=int, help="positions to decode (default: the example length)")
    p.add_argument("--prompt-lens", metavar="P1,P2,...", help="prefill lengths (default 1, L/2, L-1)")
    p.add_argument("--tol", type=float, help="max relative error allowed (default: 1e-5, or 1.5x the model's own "
                                             "error against float64 when larger, e.g. in bfloat16)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_verify)

    p = sub.add_parser("bench", help="greedy generation on MODEL: eager recompute vs the lcsm decoder "
                                     "(`bench mixer|generate|serve ...`: the full benchmarks)",
                       description="Greedy generation on MODEL to --length (teacher-forced for float inputs): the eager "
                                   "loop recomputing the model on the whole prefix per token vs an lcsm decoder session. "
                                   "`lcsm-compile bench mixer|generate|serve ...` run the full benchmarks instead "
                                   "(their own options).")
    _model_args(p)
    p.add_argument("--length", type=int, help="generate up to this many positions (default min(max_len, 256))")
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--compile", action="store_true", help="compile the lcsm step program with inductor (once, "
                                                         "before timing; the time is reported)")
    p.add_argument("--plot", metavar="OUT.png", help="per-token latency plot (matplotlib)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_bench)

    p = sub.add_parser("tune", help="calibrate the tile crossover and the cost model (lcsm_compile.costs) on this machine")
    p.add_argument("--device", default="cpu")
    p.add_argument("--channels", type=int, default=1024)
    p.add_argument("--max-size", type=int, default=256)
    p.add_argument("--no-save", action="store_true", help="print the result without caching it")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_tune)

    p = sub.add_parser("demo", help=(demo.__doc__ or "the demo").split("\n")[0].split(": ", 1)[-1].rstrip("."))
    demo.add_arguments(p)
    p.set_defaults(run=demo.main)
    return parser


def _one_line(exc):
    text = " ".join(s.strip() for s in str(exc).strip().splitlines() if s.strip())
    return text or type(exc).__name__


def _closed_pipe():
    """The reader of stdout went away (`lcsm-compile ... | head`): stop quietly with 128 + SIGPIPE,
    as Unix tools do. Python would report the unflushed rest at exit: stdout goes to /dev/null."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a file (tests capture it)
        pass
    return 141


def main(argv=None):
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C anywhere, loading the model included: one line, the shell's 128 + SIGINT
        print("lcsm-compile: interrupted", file=sys.stderr)
        return 130


def _main(argv):
    argv = list(sys.argv[1:] if argv is None else argv)
    _quiet_warnings()
    lead = [a for a in argv[:3] if a != "--traceback"]
    if lead[:1] == ["bench"] and len(lead) > 1 and lead[1] in BENCHMARKS:  # forwards everything after it
        try:
            rc = _bench_forward(lead[1], argv[argv.index(lead[1]) + 1 :])
            sys.stdout.flush()
        except BrokenPipeError:
            return _closed_pipe()
        return rc
    args = build_parser().parse_args(argv)
    args.stdout = sys.stdout  # results; with --json or --format dot everything else printed goes to stderr
    try:
        with _stdout_to_stderr(getattr(args, "json", False) or getattr(args, "format", None) in ("json", "dot")):
            rc = args.run(args)
        sys.stdout.flush()  # a closed pipe shows here, not as a traceback at exit
    except BrokenPipeError:
        return _closed_pipe()
    except LcsmError as e:  # our errors are meant for the user: one clear line, no traceback
        print(f"lcsm-compile: error: {_one_line(e)}", file=sys.stderr)
        if args.traceback:
            raise
        return 2
    except Exception as e:  # noqa: BLE001 - a failure inside the pipeline: one line unless asked
        if args.traceback:
            raise
        print(f"lcsm-compile: error: {type(e).__name__}: {_one_line(e)} (rerun with --traceback for details)",
              file=sys.stderr)
        return 1
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":
    sys.exit(main())
