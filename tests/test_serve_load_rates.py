"""benchmarks/serve_load.py's served rate: what the server sustains while requests arrive,
not diluted by the last requests' drain."""

import importlib.util
import os
import sys

import numpy as np


def _module():
    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "serve_load.py")
    spec = importlib.util.spec_from_file_location("serve_load", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["serve_load"] = mod           # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_a_server_that_keeps_up_serves_the_offered_rate():
    mod = _module()
    rng = np.random.default_rng()
    # 10 req/s for 60 s, each answered in 2-12 s: the whole run (to the last response) says
    # less than 10, the steady window says 10 (to sampling noise).
    sent = np.sort(rng.uniform(0, 60, 600))
    recs = [mod.Rec(i, "a", 8, n_out=100, status=200, ttft=0.1, latency=float(lat), sent=float(t))
            for i, (t, lat) in enumerate(zip(sent, rng.uniform(2, 12, 600)))]
    wall = max(r.sent + r.latency for r in recs)
    s = mod.summarize(recs, wall, slo=6.0)
    assert s["throughput_req_s"] < 9.3
    assert abs(s["steady_req_s"] - 10.0) < 1.0 and abs(s["steady_tok_s"] - 1000.0) < 100.0


def test_an_overloaded_server_is_measured_at_its_capacity():
    mod = _module()
    # 20 req/s offered for 60 s, served one every 0.25 s (4 req/s) in arrival order.
    recs = []
    for i in range(1200):
        t = i / 20
        done = 2.0 + 0.25 * i
        recs.append(mod.Rec(i, "a", 8, n_out=10, status=200, ttft=done - t - 0.1,
                            latency=done - t, sent=t))
    s = mod.summarize(recs, max(r.sent + r.latency for r in recs), slo=6.0)
    assert abs(s["steady_req_s"] - 4.0) < 0.1
    row = mod.sweep_row(s, model="m", adapters=0, ranks="-", rate=20.0)
    assert row["served_req_s"] == s["steady_req_s"] and row["served_req_s_run"] < 4.0


def _batch_server(rng, mod, rate, duration, slots=256, tpot=0.037, out=(8, 512)):
    """Poisson arrivals at `rate` for `duration` s into a server of `slots` rows that admits
    in arrival order and streams a token every `tpot` s per row: its capacity is
    slots / (mean output * tpot) requests per second."""
    import heapq
    sent = np.cumsum(rng.exponential(1 / rate, int(rate * duration * 1.5)))
    sent = sent[sent < duration]
    n_out = rng.integers(*out, len(sent))
    free = [0.0] * slots                     # when each row next frees
    recs = []
    for i, (t, n) in enumerate(zip(sent, n_out)):
        start = max(t, heapq.heappop(free))
        end = start + n * tpot
        heapq.heappush(free, end)
        recs.append(mod.Rec(i, "a", 8, n_out=int(n), status=200, ttft=start + tpot - t,
                            latency=end - t, sent=float(t)))
    return recs, slots / (np.mean(n_out) * tpot)


def test_a_short_window_of_an_overloaded_server_reads_its_capacity():
    # 25-s points of requests that stream for 0.3-19 s (S1-like outputs at 37 ms a token),
    # as in a saturation sweep: once the batch is full the server streams tokens at its
    # capacity whatever the mix of lengths, while completions within the window lag the
    # arrivals by the requests' latency and read low.
    mod = _module()
    rng = np.random.default_rng()
    for rate, tol in ((40.0, 0.05), (48.0, 0.05)):
        recs, capacity = _batch_server(rng, mod, rate=rate, duration=25.0)
        s = mod.summarize(recs, max(r.sent + r.latency for r in recs), slo=6.0)
        assert 20.0 < capacity < 32.0
        assert abs(s["steady_req_s"] - capacity) < tol * capacity, (rate, s, capacity)
        assert s["completed_req_s"] < s["steady_req_s"]
        row = mod.sweep_row(s, model="m", adapters=0, ranks="-", rate=rate)
        assert row["served_req_s"] == s["steady_req_s"]
        assert row["completed_req_s"] == s["completed_req_s"]
    # below saturation neither reads more than was offered
    recs, _ = _batch_server(rng, mod, rate=16.0, duration=25.0)
    s = mod.summarize(recs, max(r.sent + r.latency for r in recs), slo=6.0)
    offered = len(recs) / max(r.sent for r in recs)
    assert s["completed_req_s"] < s["steady_req_s"] < 1.05 * offered
