"""Per-token cost of a Hyena LM step program: flash vs lazy vs floor banks, and one eager forward.

Usage: python benchmarks/decode_step.py LAYERS D_MODEL MAX_LEN   (prompt 128, eager step program)
"""
import torch, sys, time, warnings
warnings.filterwarnings("ignore")
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from examples.models.hyena import hyena_lm
import lcsm_compile
torch.manual_seed(0)
NL, D, ML = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
m = hyena_lm(order=2, n_layer=NL, vocab=256, d_model=D, max_len=ML).eval()
inp = (torch.randint(0, 256, (1, 64)),)
t0=time.time(); dec = lcsm_compile.optimize(m, inp); print(f"optimize {time.time()-t0:.1f}s")
report = dec.report
ids = torch.randint(0, 256, (1, ML))
with torch.no_grad():
  for conv in ["flash", "lazy", "floor"]:
    d = dec if conv == "flash" else lcsm_compile.build_decoder(report, inp, max_len=ML, conv=conv)
    s = d.session(); s.prefill(ids[:, :128])
    t0=time.perf_counter()
    for t in range(128, ML): s.step(ids[:, t:t+1])
    dt=time.perf_counter()-t0
    print(f"{conv:6s} {dt:.2f}s  {dt/(ML-128)*1e6:.0f} us/step")
  for _ in range(3): m(ids[:, :1])
  t0=time.perf_counter()
  for _ in range(50): m(ids[:, :1])
  print(f"eager forward on 1 position: {(time.perf_counter()-t0)/50*1e6:.0f} us")
