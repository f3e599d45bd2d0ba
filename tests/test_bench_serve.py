"""The serving benchmark's --quick run: every method decodes every request to the same tokens as
one request at a time, and the outputs are consistent. No timing assertions (noisy machines)."""

import json

from lcsm_compile.tools.bench import serve


def test_requests_follow_their_ranges():
    reqs = serve.make_requests(50, (2, 9), (1, 4), vocab=7, seed=3)
    assert all(2 <= p.shape[1] <= 9 and 1 <= n <= 4 and int(p.max()) < 7 for p, n in reqs)
    assert len({p.shape[1] for p, _ in reqs}) > 1 and len({n for _, n in reqs}) > 1
    again = serve.make_requests(50, (2, 9), (1, 4), vocab=7, seed=3)
    assert all((p == q).all() and n == m for (p, n), (q, m) in zip(reqs, again))


def test_quick_run_serves_every_request_exactly(tmp_path, capsys):
    assert serve.main(["--quick", "--out", str(tmp_path), "--threads", "1"]) == 0
    data = json.loads((tmp_path / "serve.json").read_text())
    expected = sum(r["output"] for r in data["requests"])
    assert set(data["results"]) == set(serve.METHODS)
    for name, r in data["results"].items():
        assert r["tokens_equal"], name
        assert r["tokens"] == expected, name
        lat = r["token_latency_s"]
        assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"], name
        assert len(r["latencies_s"]) == expected - len(data["requests"])  # one gap per token after the first
    assert data["results"]["sequential"]["speedup"] == 1.0
    out = capsys.readouterr().out
    assert "continuous" in out and "WRONG" not in out and "DIFFER" not in out
