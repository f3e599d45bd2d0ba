"""Modal long convolutions decoded by their recurrence, against the tiling and the model's own kind of
decoder: a StripedHyena-style LM (examples/models/striped_hyena.py) teacher-forced from a prompt to L,
side by side in one run:
- "auto":  optimize() with the default strategy (per long convolution, the recurrence or the tiling,
           whichever the device's costs from `lcsm-compile tune` say is faster at max_len);
- "recurrent": optimize(strategy="recurrent"), every proved modal filter on its recurrence;
- "tile":  optimize(strategy="tile"), every long convolution on the relaxed tiling;
- "recurrent, compiled": the recurrence with compile=True (inductor; compiled before the timed session);
- "eager": a recurrent decoder written the way StripedHyena's own code steps its state (a FIR state
           of the last K-1 inputs and an IIR state of N complex modes per channel, in the model dtype).
Per method: ms per token, relative error of the logits against the float64 model over the whole
decode, and the session's state bytes at each --state-max-len (the modal state does not grow).
The others run their step program eagerly (compile=False), as the eager decoder does.

--mixer-width W checks the cost model's choice on one StripedHyena mixer of width W (no
projections around it) at each --mixer-lengths L: the seconds per step it predicts for the
recurrence and for the tiling (red cell, engine step and tiles) against the measured per-step time of a
teacher-forced decode to L with each (the faster of two runs), and whether the choice was the
faster one.

Run alone on a quiet machine: python benchmarks/recurrent.py [--L 8192] [--layers 8] [--d 256]
    [--state 16] [--prompt 128] [--threads 2] [--state-max-len 4096 65536]
    [--mixer-width 4096 --mixer-lengths 8192 65536] [--out bench_out/]
"""

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lcsm_compile  # noqa: E402
from examples.models.striped_hyena import ParallelHyenaFilter, striped_hyena_lm  # noqa: E402
from lcsm_compile import tuning  # noqa: E402
from lcsm_compile.tools.bench import common  # noqa: E402


class EagerRecurrentLM:
    """StripedHyena's cached decoding: per block, the short filter steps a ring of its last K-1
    inputs, the long filter a complex state s <- p s + x1v with y = Re(sum r s) + D x1v."""

    def __init__(self, model):
        self.m = model

    def prefill(self, ids):
        self.fir, self.iir = [], []
        x = self.m.embedding(ids)
        for b in self.m.blocks:
            f = b.filter
            z = b.projections(b.pre_norm(x)).transpose(1, 2)  # B 3D L
            K, L = f.short_filter_length, z.shape[-1]
            self.fir.append(F.pad(z, (K - 1, 0))[..., -(K - 1):])
            zc = F.conv1d(z, f.short_filter_weight, padding=K - 1, groups=z.shape[1])[..., :L] + f.short_filter_bias[:, None]
            x2, x1, v = zc.split(f.hidden_size, dim=1)
            x1v = x1 * v
            p, r = self._modes(f)
            t = torch.arange(L - 1, -1, -1, dtype=torch.float32)
            self.iir.append(torch.einsum("bdl,dnl->bdn", x1v.to(p.dtype), p[..., None] ** t))  # the state after the prompt
            h = (r[..., None] * p[..., None] ** torch.arange(L, dtype=torch.float32)).real.sum(1)
            y = torch.fft.irfft(torch.fft.rfft(x1v, n=2 * L) * torch.fft.rfft(h, n=2 * L), n=2 * L)[..., :L]
            y = (y + x1v * f.D[:, None]) * x2
            x = self._finish(b, y.transpose(1, 2), x)
        return self.m.lm_head(self.m.norm_f(x))

    def step(self, ids):
        x = self.m.embedding(ids)[:, 0]  # B D
        for i, b in enumerate(self.m.blocks):
            f = b.filter
            z = b.projections(b.pre_norm(x))  # B 3D
            window = torch.cat([self.fir[i], z[..., None]], -1)  # B 3D K
            self.fir[i] = window[..., 1:]
            zc = (window * f.short_filter_weight[:, 0]).sum(-1) + f.short_filter_bias
            x2, x1, v = zc.split(f.hidden_size, dim=-1)
            x1v = x1 * v
            p, r = self._modes(f)
            self.iir[i] = p * self.iir[i] + x1v[..., None]
            y = ((r * self.iir[i]).sum(-1).real + f.D * x1v) * x2
            x = self._finish(b, y, x)
        return self.m.lm_head(self.m.norm_f(x))[:, None]

    @staticmethod
    def _modes(f):
        return torch.view_as_complex(f.poles)[..., 0], torch.view_as_complex(f.residues)[..., 0]  # [D, N]

    @staticmethod
    def _finish(b, y, u):
        z = b.out_filter_dense(y) + u
        return b.mlp(b.post_norm(z)) + z


def decode(prefill, step, ids, P):
    """Teacher-forced logits over ids [1, L] from a P-token prompt, and seconds per step."""
    outs = [prefill(ids[:, :P])]
    start = common.clock()
    for t in range(P, ids.shape[1]):
        outs.append(step(ids[:, t : t + 1]))
    return torch.cat(outs, 1), (common.clock() - start) / (ids.shape[1] - P)


def optimized(model, prompt, L, strategy, compile=False, validate=True):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        decoder = lcsm_compile.optimize(model, (prompt,), max_len=L, strategy=strategy, compile=compile, validate=validate)
        if compile:  # the compile (seconds) happens here, not in the timed session
            warm = decoder.session()
            warm.prefill(prompt)
            warm.step(prompt[:, :1])
        return decoder


def state_bytes(model_args, max_len, strategy, prompt):
    """A session's state after a prompt (its rows' tiles or modes, rings; not the shared filters)."""
    decoder = optimized(striped_hyena_lm(**model_args, max_len=max_len), prompt, max_len, strategy, validate=False)
    session = decoder.session()
    session.prefill(prompt)
    parts = session.memory_breakdown()
    return sum(parts.get(k, 0) for k in ("state", "block", "rings", "recurrent")), len(decoder.recurrent)


def mixer_check(width, state, lengths, prompt_len):
    """The cost model's choice on one modal mixer of `width` channels, predicted against measured:
    each strategy decodes twice (recurrent, tile, tile, recurrent) and keeps its faster run."""
    costs, crossover = tuning.costs_for("cpu"), tuning.crossover_for("cpu")
    rows = []
    for L in lengths:
        mixer = ParallelHyenaFilter(width, L, state_size=state).eval()
        x = torch.randn(1, L, 3 * width, generator=torch.Generator().manual_seed(L))  # [x2, x1, v], as projected
        predicted = {"recurrent": costs.recurrent(state, width), "tile": costs.tiled(L, width, width, crossover)}
        decoders = {s: optimized(mixer, x[:, :prompt_len], L, s, validate=False) for s in ("recurrent", "tile")}
        measured = {}
        for strategy in ("recurrent", "tile", "tile", "recurrent"):
            session = decoders[strategy].session()
            seconds = decode(session.prefill, session.step, x, prompt_len)[1]
            measured[strategy] = min(seconds, measured.get(strategy, seconds))
            del session
        (site,) = [s for s in decoders["tile"].schedule.sites if s["kind"] == "long"]
        chosen = "recurrent" if site["recurrent_from"] is not None and L >= site["recurrent_from"] else "tile"
        rows.append({"L": L, "width": width, "modes": state, "chosen": chosen,
                     "predicted_us": {k: v * 1e6 for k, v in predicted.items()},
                     "measured_us": {k: v * 1e6 for k, v in measured.items()},
                     "faster": min(measured, key=measured.get)})
        del decoders
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--L", type=int, default=8192)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--state", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--state-max-len", type=int, nargs="*", default=[4096, 65536])
    ap.add_argument("--mixer-width", type=int, default=0, help="check the cost model's choice on one mixer this wide")
    ap.add_argument("--mixer-lengths", type=int, nargs="*", default=[8192, 65536])
    ap.add_argument("--out", default="bench_out")
    args = ap.parse_args(argv)
    t_all = time.perf_counter()
    model_args = dict(layers=args.layers, d_model=args.d, state_size=args.state, vocab=256)
    with common.torch_threads(args.threads), torch.no_grad():
        model = striped_hyena_lm(**model_args, max_len=args.L)
        ids = torch.randint(0, 256, (1, args.L), generator=torch.Generator().manual_seed(0))
        want = model.double()(ids)
        model.float()
        prompt = ids[:, : args.prompt]
        rows, results = [], {}
        for name in ("auto", "recurrent", "tile", "recurrent, compiled", "eager"):
            if name == "eager":
                eager = EagerRecurrentLM(model)
                logits, per_step = decode(eager.prefill, eager.step, ids, args.prompt)
                recurrent = args.layers
            else:
                decoder = optimized(model, prompt, args.L, name.split(",")[0], compile=name.endswith("compiled"))
                session = decoder.session()
                logits, per_step = decode(session.prefill, session.step, ids, args.prompt)
                recurrent = len(decoder.recurrent)
            results[name] = {"ms_per_token": per_step * 1e3, "rel_err": common.rel_err(logits, want),
                             "recurrent_convs": recurrent}
        for name, r in results.items():
            rows.append([name, r["recurrent_convs"], f"{r['ms_per_token']:.3f}",
                         f"{r['ms_per_token'] / results['auto']['ms_per_token']:.2f}", f"{r['rel_err']:.1e}"])
        print(f"StripedHyena-style LM: {args.layers} layers, d_model {args.d}, state {args.state}, prompt {args.prompt}, "
              f"teacher-forced to L = {args.L}, {torch.get_num_threads()} threads")
        print(common.format_table(["method", "recurrent convs", "ms/token", "x auto", "rel err vs float64"], rows))
        memory = []
        for max_len in args.state_max_len:
            for strategy in ("recurrent", "tile"):
                nbytes, rec = state_bytes(model_args, max_len, strategy, prompt)
                memory.append({"max_len": max_len, "strategy": strategy, "state_bytes": nbytes, "recurrent_convs": rec})
        print("\nsession state after the prompt (one row; shared filters excluded)")
        print(common.format_table(["max_len", "strategy", "recurrent convs", "state MiB"],
                                  [[m["max_len"], m["strategy"], m["recurrent_convs"], f"{m['state_bytes'] / 2**20:.2f}"]
                                   for m in memory]))
        mixer = mixer_check(args.mixer_width, args.state, args.mixer_lengths, args.prompt) if args.mixer_width else []
        if mixer:
            print(f"\nthe cost model's choice on one mixer of width {args.mixer_width}, {args.state} modes "
                  f"(us per step: predicted by lcsm-compile tune's costs, measured teacher-forced; the measured step "
                  f"includes the mixer's other ops, the same for both)")
            print(common.format_table(
                ["L", "chosen", "pred recurrent", "pred tile", "meas recurrent", "meas tile", "faster", "right"],
                [[m["L"], m["chosen"], f"{m['predicted_us']['recurrent']:.1f}", f"{m['predicted_us']['tile']:.1f}",
                  f"{m['measured_us']['recurrent']:.1f}", f"{m['measured_us']['tile']:.1f}", m["faster"],
                  "yes" if m["chosen"] == m["faster"] else "no"] for m in mixer]))
    data = {"args": vars(args), "machine": common.machine_info(), "decode": results, "memory": memory, "mixer": mixer,
            "wall_s": time.perf_counter() - t_all}

    def plot(path):
        if memory:
            series = [{"x": [m["max_len"] for m in memory if m["strategy"] == s],
                       "y": [m["state_bytes"] for m in memory if m["strategy"] == s], "label": f"{s} session state"}
                      for s in ("recurrent", "tile")]
            common.plot_loglog(path, series, xlabel="max_len", ylabel="bytes", title="session state against max_len")
        else:  # --state-max-len with no lengths: the per-token times alone
            series = [{"x": [args.L], "y": [r["ms_per_token"] / 1e3], "label": name} for name, r in results.items()]
            common.plot_loglog(path, series, ylabel="seconds per token", title="teacher-forced decode")

    common.write_outputs(args.out, "recurrent", data, plot, print)


if __name__ == "__main__":
    main()
