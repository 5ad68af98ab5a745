"""benchmarks/plot_saturation.py: the rate each series sustains within the SLO, and the
figure written from a sweep's JSON."""

import importlib.util
import json
import os

import numpy as np
import pytest


def _module():
    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "plot_saturation.py")
    spec = importlib.util.spec_from_file_location("plot_saturation", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(model, ranks, n, offered, served, slo, rng):
    return {"system": "slora-jax", "model": model, "adapters": n, "ranks": ranks,
            "offered_req_s": offered, "served_req_s": served, "output_tok_s": 250 * served,
            "slo_attainment": slo, "ttft_p50_s": float(rng.uniform(0.05, 2)),
            "ttft_p99_s": float(rng.uniform(2, 6)), "tpot_ms": float(rng.uniform(10, 40))}


def _sweep(rng):
    """Random rising sweeps: each series' served rate grows with the offered one until its
    SLO attainment falls under 90% (its last point), as serve_load's sweep stops."""
    rows, best = [], {}
    for model, ranks, n in [("llama-7b", "-", 0), ("llama-7b", "8", 1000),
                            ("llama-7b", "8-64", 100), ("llama-3-8b", "8", 1000)]:
        offered = np.arange(10, 10 + 4 * rng.integers(2, 6), 4.0)
        served = np.sort(rng.uniform(5, 30, offered.size))
        slo = np.r_[rng.uniform(0.9, 1.0, offered.size - 1), rng.uniform(0.3, 0.899)]
        rows += [_row(model, ranks, n, float(o), float(s), float(a), rng)
                 for o, s, a in zip(offered, served, slo)]
        best[(model, ranks, n)] = float(served[-2])     # the last is over the SLO
    rng.shuffle(rows)
    return rows, best


def test_sustained_is_the_best_served_rate_within_the_slo():
    mod = _module()
    rng = np.random.default_rng()
    rows, best = _sweep(rng)
    assert mod.sustained(rows) == best
    # a series none of whose points met the SLO sustains nothing
    rows.append(_row("llama-7b", "8", 5, 40.0, 25.0, 0.5, rng))
    assert mod.sustained(rows)[("llama-7b", "8", 5)] is None


def test_main_writes_a_png_and_prints_the_sustained_rates(tmp_path, capsys):
    mod = _module()
    rng = np.random.default_rng()
    rows, best = _sweep(rng)
    path = tmp_path / "saturation_gpu_abc1234.json"
    path.write_text(json.dumps({"device": "gpu", "commit": "abc1234", "date": "2026-12-07",
                                "rows": rows}))
    assert mod.main([str(path)]) == 0
    png = tmp_path / "saturation_gpu_abc1234.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    out = capsys.readouterr().out
    for (model, ranks, n), b in best.items():
        assert f"| {model} | {ranks} | {n} | {b:.2f} |" in out


@pytest.mark.parametrize("content, says", [
    ({"rows": []}, "no sweep rows"),
    ({"rows": [{"model": "m", "adapters": 0}]}, "row 0 lacks"),
])
def test_a_file_without_sweep_rows_is_refused_by_name(tmp_path, capsys, content, says):
    mod = _module()
    path = tmp_path / "x.json"
    path.write_text(json.dumps(content))
    assert mod.main([str(path)]) == 2
    err = capsys.readouterr().err
    assert says in err and str(path) in err
    assert not (tmp_path / "x.png").exists()


def test_no_two_series_share_a_colour_and_marker():
    mod = _module()
    rng = np.random.default_rng()
    keys = [(m, r, int(n)) for m in ("llama-7b", "llama-3-8b") for r in ("-", "8", "8-64")
            for n in rng.choice(5000, size=int(rng.integers(4, 9)), replace=False)]
    style = mod.styles(sorted(keys))
    assert len(set(style.values())) == len(keys)
    # one model's series keep one marker while the colours last
    first = [style[k][1] for k in sorted(keys)[:20] if k[0] == sorted(keys)[0][0]]
    assert len(set(first)) == 1
