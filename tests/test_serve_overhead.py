"""benchmarks/serve_overhead.py's result file: written after every phase, and a run of some
phases keeps an earlier run's figures for the others (at the same commit)."""

import importlib.util
import json
import os
import sys


def _module():
    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "serve_overhead.py")
    spec = importlib.util.spec_from_file_location("serve_overhead", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["serve_overhead"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_partial_runs_fill_each_other(tmp_path, monkeypatch):
    mod = _module()
    monkeypatch.setenv("SLORA_COMMIT", "abc1234")
    out = str(tmp_path)
    first = ["--out", out, "--adapters", "10", "--skip", "engine,http"]
    args = mod.build_parser().parse_args(first)
    # The step phase alone (the rest of that run timed out): its rows, no TPOT yet.
    path, rec = mod._record(args, first, {"step": {"0": 19.5, "10": 21.0}})
    assert [(r["step_ms"], r["http_tpot_ms"]) for r in rec["rows"]] == [(19.5, None), (21.0, None)]
    with open(path, "w") as f:
        json.dump(rec, f)
    assert os.path.basename(path).endswith("_abc1234.json") and rec["command"].endswith(
        "--skip engine,http")

    # A later run of the HTTP phase keeps the step figures and says where they came from.
    second = ["--out", out, "--adapters", "10", "--skip", "startup,step,engine"]
    args = mod.build_parser().parse_args(second)
    path2, rec = mod._record(args, second, {"http": {"0": 17.0, "10": 18.5}})
    assert path2 == path
    assert [(r["adapters"], r["step_ms"], r["http_tpot_ms"]) for r in rec["rows"]] == [
        (0, 19.5, 17.0), (10, 21.0, 18.5)]
    assert rec["command"].startswith("benchmarks/serve_overhead.py " + " ".join(second))
    assert "from: benchmarks/serve_overhead.py " + " ".join(first) in rec["command"]
    assert rec["start_s"] == {"cold": None, "warm": None}     # no run measured it

    with open(path, "w") as f:
        json.dump(rec, f)

    # A phase this run measured replaces the earlier figure.
    path3, rec = mod._record(args, second, {"http": {"0": 16.0, "10": 18.0}})
    assert [(r["step_ms"], r["http_tpot_ms"]) for r in rec["rows"]] == [(19.5, 16.0),
                                                                         (21.0, 18.0)]
    assert "from: benchmarks/serve_overhead.py " + " ".join(first) in rec["command"]


def test_unknown_phase_is_refused(capsys):
    mod = _module()
    import pytest
    with pytest.raises(SystemExit):
        mod.main(["--skip", "stepp"])
    assert "unknown phases ['stepp']" in capsys.readouterr().err
