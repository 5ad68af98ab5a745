"""Serving benchmark: S-LoRA's synthetic multi-adapter workload against the HTTP server.

The trace follows S-LoRA's synthetic workloads: n adapters with power-law
popularity (adapter index = floor(n * X), X ~ numpy `power(alpha)`, so a
small alpha concentrates load on few adapters), arrivals at total rate R
with gamma-distributed gaps of coefficient of variation cv (cv = 1 is
Poisson), input and output lengths uniform in ranges. Each request asks for
exactly its output length (`ignore_eos`) and is streamed, to time its first
token. Prompts are random token ids, so any model works, tokenizer or not.

Reported: throughput (req/s, output tok/s), mean/p50/p99 latency, TTFT and
time per output token, SLO attainment (share of all requests, failed ones
included, whose first token came within --slo-ttft seconds, S-LoRA's
metric), errors by HTTP status, and the server's adapter-load counters. The
table is printed and a JSON record (device, jax version, git commit,
command) is written under benchmarks/results/.

    # CPU smoke run: tiny preset
    python benchmarks/serve_load.py --quick
    # GPU: Llama-7B shape, 1000 random adapters (S-LoRA's S1-like setting)
    python benchmarks/serve_load.py --dummy llama-7b --dummy-adapters 1000 \\
        --config configs/server/llama-7b.yaml --rate 8 --duration 300 \\
        --input-range 8,512 --output-range 8,512 --alpha 1 --cv 1
    # against a running server
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --rate 4 --num-requests 200

Any `slora-jax serve` flag (--model/--dummy, --config, --dummy-adapters,
--adapters, ...) starts the real server (`python -m serving.server`, its engine in a
process of its own) for the run, so the load generator shares no interpreter with it;
--url uses a running one.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time

import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
for _p in (_ROOT, _HERE):        # _HERE: client processes import this module by name
    if _p not in sys.path:
        sys.path.insert(0, _p)

from server_process import (ServerProcess, counter_diff, device_name,  # noqa: E402
                            server_counters, step_summary)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="S-LoRA synthetic workload against an OpenAI-compatible multi-LoRA server.",
        epilog="Other flags are `slora-jax serve` flags: the server is started with them as "
               "a process of its own (see `python -m serving.server --help`).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--url", help="a running server (else one is started as a subprocess)")
    p.add_argument("--quick", action="store_true",
                   help="CPU smoke run: tiny preset, 40 short requests")
    p.add_argument("--num-adapters", type=int, default=0,
                   help="adapters drawn from (0 = every adapter the server lists)")
    p.add_argument("--alpha", type=float, default=1.0, help="power-law popularity exponent")
    p.add_argument("--rate", type=float, default=2.0, help="arrivals per second")
    p.add_argument("--cv", type=float, default=1.0, help="coefficient of variation of gaps")
    p.add_argument("--duration", type=float, default=60.0, help="trace length in seconds")
    p.add_argument("--num-requests", type=int, default=0, help="overrides rate*duration")
    p.add_argument("--input-range", default="8,512", help="prompt tokens, uniform in [lo, hi)")
    p.add_argument("--output-range", default="8,512", help="output tokens, uniform in [lo, hi)")
    p.add_argument("--base-fraction", type=float, default=0.0,
                   help="share of requests for the base model (no adapter)")
    p.add_argument("--slo-ttft", type=float, default=6.0, help="first-token SLO in seconds")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout (s)")
    p.add_argument("--out-dir", default=os.path.join(_ROOT, "benchmarks", "results"))
    p.add_argument("--tag", default="", help="suffix of the result file name")
    p.add_argument("--sweep", metavar="RATES",
                   help="offered rates to try in order (comma list, req/s), each for --duration "
                        "seconds, stopping after the first whose first-token SLO attainment "
                        "falls below 90%%; rows go to saturation_<device>_<commit>.json in "
                        "--out-dir (merged with the rows of other runs of this commit)")
    p.add_argument("--sweep-adapters", metavar="COUNTS",
                   help="adapter counts swept in turn against one server (comma list, 0 = the "
                        "base model only; default: --num-adapters); each count after the first "
                        "starts at the highest rate the previous count sustained, and steps "
                        "down while its first rate misses the SLO")
    p.add_argument("--sweep-budget", type=float, default=0.0, metavar="SECONDS",
                   help="start no sweep point after this many seconds (0 = no limit); rows "
                        "are written after every point")
    p.add_argument("--clients", type=int, default=default_clients(),
                   help="client processes sharing the trace (default: one per four cores, "
                        "at most four)")
    p.add_argument("--server-log", metavar="FILE",
                   help="where the started server's log goes (default: discarded)")
    p.add_argument("--ranks-label", help="the adapters' ranks in the sweep rows (default: "
                                         "from --dummy-ranks, e.g. 8 or 8-64)")
    return p


_QUICK = dict(num_requests=40, rate=20.0, input_range="4,32", output_range="4,24")
_QUICK_SERVER = ["--dummy", "tiny", "--config", os.path.join(_ROOT, "configs", "server",
                                                             "tiny.yaml"),
                 "--dummy-adapters", "20", "--dummy-ranks", "4,8"]


@dataclasses.dataclass
class Req:
    i: int
    t: float            # arrival offset (s)
    adapter: str
    prompt: list[int]
    max_tokens: int


@dataclasses.dataclass
class Rec:
    i: int
    adapter: str
    n_in: int
    n_out: int = 0
    status: int = 0
    ttft: float | None = None
    latency: float | None = None
    sent: float | None = None   # seconds from the trace's origin to the request's send
    error: str | None = None


def _range(s: str) -> tuple[int, int]:
    lo, hi = (int(x) for x in s.split(","))
    if not 1 <= lo < hi:
        raise SystemExit(f"bad range '{s}': need 1 <= lo < hi")
    return lo, hi


def make_trace(args, adapters: list[str], base: str, vocab: int, max_len: int) -> list[Req]:
    """S-LoRA's synthetic trace (power-law adapters, gamma arrivals, uniform lengths)."""
    rng = np.random.default_rng(args.seed)
    n = args.num_requests or max(1, int(args.rate * args.duration))
    pool = adapters[:args.num_adapters] if args.num_adapters else adapters
    idx = (rng.power(args.alpha, n) * len(pool)).astype(int) if pool else np.zeros(n, int)
    use_base = rng.random(n) < args.base_fraction if pool else np.ones(n, bool)
    (ilo, ihi), (olo, ohi) = _range(args.input_range), _range(args.output_range)
    n_in = rng.integers(ilo, ihi, n)
    n_out = rng.integers(olo, ohi, n)
    shape = 1.0 / (args.cv * args.cv)
    gaps = rng.gamma(shape, args.cv * args.cv / args.rate, n)
    t = np.cumsum(gaps) - gaps[0]
    reqs = []
    for i in range(n):
        li = int(min(n_in[i], max_len - 1))
        lo = int(min(n_out[i], max_len - li))
        reqs.append(Req(i, float(t[i]), base if use_base[i] else pool[min(idx[i], len(pool) - 1)],
                        [int(x) for x in rng.integers(3, vocab, li)], lo))
    return reqs


async def _one(client, url: str, r: Req, t0: float, timeout: float) -> Rec:
    import httpx
    await asyncio.sleep(max(0.0, t0 + r.t - time.perf_counter()))
    rec = Rec(r.i, r.adapter, len(r.prompt))
    start = time.perf_counter()
    rec.sent = start - t0
    body = {"model": r.adapter, "prompt": r.prompt, "max_tokens": r.max_tokens,
            "temperature": 0.0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body,
                                 timeout=timeout) as resp:
            rec.status = resp.status_code
            if resp.status_code != 200:
                rec.error = (await resp.aread()).decode()[:300]
                return rec
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                d = json.loads(line[6:])
                if "error" in d:
                    rec.error = d["error"]["message"]
                    break
                if d.get("choices") and rec.ttft is None:
                    rec.ttft = time.perf_counter() - start
                if d.get("usage"):
                    rec.n_out = d["usage"]["completion_tokens"]
        rec.latency = time.perf_counter() - start
    except httpx.HTTPError as e:
        rec.error = f"{type(e).__name__}: {e}"
    return rec


async def run_trace(url: str, reqs: list[Req], timeout: float,
                    start_at: float | None = None) -> tuple[list[Rec], float]:
    """Every request of `reqs` at its arrival offset from now (or from the wall-clock time
    `start_at`); the records and the seconds from that origin to the last response."""
    import httpx
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        t0 = time.perf_counter() + (0.0 if start_at is None else start_at - time.time())
        recs = await asyncio.gather(*(_one(client, url, r, t0, timeout) for r in reqs))
        return list(recs), time.perf_counter() - t0


def _client_part(url: str, reqs: list[Req], timeout: float, start_at: float):
    return asyncio.run(run_trace(url, reqs, timeout, start_at))


def default_clients() -> int:
    """Client processes: one per four cores, at most four (a process parsing every
    stream's events tops out near a few thousand events a second)."""
    return max(1, min(4, (os.cpu_count() or 1) // 4))


def drive(url: str, reqs: list[Req], timeout: float, clients: int = 1
          ) -> tuple[list[Rec], float]:
    """`run_trace` spread over `clients` processes (request i to process i % clients), all
    timed from one wall-clock origin, so the load generator is not what saturates."""
    if clients <= 1 or len(reqs) < 2:
        return asyncio.run(run_trace(url, reqs, timeout))
    import multiprocessing
    start_at = time.time() + 2.0                       # the processes' start-up fits in 2 s
    parts = [reqs[k::clients] for k in range(clients)]
    with multiprocessing.get_context("spawn").Pool(clients) as pool:
        out = pool.starmap(_client_part, [(url, part, timeout, start_at) for part in parts])
    recs = sorted((r for part, _ in out for r in part), key=lambda r: r.i)
    return recs, max(wall for _, wall in out)


def _pct(xs, q):
    return float(np.percentile(xs, q)) if xs else float("nan")


def _window(ok: list[Rec]) -> tuple[float, float] | None:
    """While arrivals go on, after the first quarter of the arrival window (the batch
    filling up); None for a trace too short."""
    sent = [r.sent for r in ok if r.sent is not None]
    if len(sent) < 8 or max(sent) <= 0:
        return None
    return max(sent) / 4, max(sent)


def _tokens_in(r: Rec, lo: float, hi: float) -> float:
    """Output tokens `r` streamed within [lo, hi]: its first at send + TTFT, the rest
    evenly until its last (a request without a first-token time streams from its send)."""
    first = r.sent + (r.ttft if r.ttft is not None else 0.0)
    end = r.sent + r.latency
    n = float(lo <= first <= hi)
    if r.n_out > 1 and end > first:
        n += (r.n_out - 1) * max(0.0, min(end, hi) - max(first, lo)) / (end - first)
    return n


def steady_rates(ok: list[Rec]) -> tuple[float, float] | None:
    """The rate the server sustains while requests arrive: output tokens it streamed per
    second within the window, and that over the trace's mean output length as requests per
    second. Once the batch is full, tokens stream at the server's capacity whatever the mix
    of request lengths, while completions within a window short against the requests'
    latency lag the arrivals (`completed_rate`). Below saturation both read somewhat low
    in such a window: its first arrivals had no predecessors still streaming."""
    win = _window(ok)
    if win is None:
        return None
    lo, hi = win
    tok = sum(_tokens_in(r, lo, hi) for r in ok if r.sent is not None) / (hi - lo)
    mean_out = float(np.mean([r.n_out for r in ok]))
    return (tok / mean_out if mean_out > 0 else 0.0), tok


def completed_rate(ok: list[Rec]) -> float | None:
    """Requests completed per second within the same window: the served rate only once the
    window is long against the requests' latency."""
    win = _window(ok)
    if win is None:
        return None
    lo, hi = win
    return sum(1 for r in ok if r.sent is not None and lo <= r.sent + r.latency <= hi) / (hi - lo)


def summarize(recs: list[Rec], wall: float, slo: float) -> dict:
    ok = [r for r in recs if r.status == 200 and r.error is None and r.latency is not None]
    steady, completed = steady_rates(ok), completed_rate(ok)
    lat = [r.latency for r in ok]
    ttft = [r.ttft for r in ok if r.ttft is not None]
    tpot = [(r.latency - r.ttft) / (r.n_out - 1) for r in ok if r.n_out > 1 and r.ttft]
    out_tok = sum(r.n_out for r in ok)
    errors: dict[str, int] = {}
    for r in recs:
        if r not in ok:
            k = str(r.status or "client")
            errors[k] = errors.get(k, 0) + 1
    return {
        "requests": len(recs), "completed": len(ok), "errors": errors, "wall_s": wall,
        "throughput_req_s": len(ok) / wall, "output_tok_s": out_tok / wall,
        "steady_req_s": steady[0] if steady else len(ok) / wall,
        "steady_tok_s": steady[1] if steady else out_tok / wall,
        "completed_req_s": completed if completed is not None else len(ok) / wall,
        "total_tok_s": (out_tok + sum(r.n_in for r in ok)) / wall,
        "latency_mean_s": float(np.mean(lat)) if lat else float("nan"),
        "latency_p50_s": _pct(lat, 50), "latency_p99_s": _pct(lat, 99),
        "ttft_mean_s": float(np.mean(ttft)) if ttft else float("nan"),
        "ttft_p50_s": _pct(ttft, 50), "ttft_p99_s": _pct(ttft, 99),
        "tpot_mean_s": float(np.mean(tpot)) if tpot else float("nan"),
        "slo_ttft_s": slo,
        "slo_attainment": sum(1 for r in ok if r.ttft is not None and r.ttft <= slo) / len(recs),
    }


def _git() -> str:
    if os.environ.get("SLORA_COMMIT"):       # the device machine's copy has no git history
        return os.environ["SLORA_COMMIT"]
    try:
        rev = subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], cwd=_ROOT, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=_ROOT, capture_output=True, text=True, timeout=10).stdout
        return rev + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def print_table(s: dict) -> None:
    rows = [("requests (completed)", f"{s['requests']} ({s['completed']})"),
            ("errors by status", json.dumps(s["errors"]) if s["errors"] else "none"),
            ("throughput", f"{s['throughput_req_s']:.2f} req/s, {s['output_tok_s']:.1f} out tok/s"),
            ("while arriving (steady)",
             f"{s['steady_req_s']:.2f} req/s, {s['steady_tok_s']:.1f} out tok/s"),
            ("latency mean / p50 / p99",
             f"{s['latency_mean_s']:.3f} / {s['latency_p50_s']:.3f} / {s['latency_p99_s']:.3f} s"),
            ("TTFT mean / p50 / p99",
             f"{s['ttft_mean_s']:.3f} / {s['ttft_p50_s']:.3f} / {s['ttft_p99_s']:.3f} s"),
            ("time per output token", f"{1000 * s['tpot_mean_s']:.2f} ms"),
            (f"SLO attainment (TTFT <= {s['slo_ttft_s']:g}s)", f"{100 * s['slo_attainment']:.1f}%")]
    w = max(len(k) for k, _ in rows)
    print()
    for k, v in rows:
        print(f"  {k:<{w}}  {v}")
    print()


SWEEP_FLOOR = 0.9      # a sweep stops after the first rate below this SLO attainment
SERVED = ("served_req_s: output tokens streamed per second while requests arrive, after "
          "the window's first quarter, over the mean output length; completed_req_s: "
          "requests completed per second in that window")


def sweep_row(s: dict, *, model: str, adapters: int, ranks: str, rate: float) -> dict:
    """One saturation row from a `summarize` result."""
    return {"system": "slora-jax", "model": model, "adapters": adapters, "ranks": ranks,
            "offered_req_s": rate, "served_req_s": s["steady_req_s"],
            "output_tok_s": s["steady_tok_s"], "completed_req_s": s["completed_req_s"],
            # the whole run's: from the first send to the last response, drain included
            "served_req_s_run": s["throughput_req_s"], "output_tok_s_run": s["output_tok_s"],
            "slo_attainment": s["slo_attainment"],
            "ttft_p50_s": s["ttft_p50_s"], "ttft_p99_s": s["ttft_p99_s"],
            "tpot_ms": 1000 * s["tpot_mean_s"], "requests": s["requests"],
            "errors": s["errors"]}


def merge_rows(old: list[dict], new: list[dict]) -> list[dict]:
    """`new` replaces the rows of `old` with the same model, adapters, ranks and rate."""
    key = lambda r: (r["model"], r["adapters"], r["ranks"], r["offered_req_s"])
    keep = {key(r) for r in new}
    rows = [r for r in old if key(r) not in keep] + new
    return sorted(rows, key=key)


def _ranks_label(args, server_argv: list[str]) -> str:
    if args.ranks_label:
        return args.ranks_label
    if "--dummy-ranks" in server_argv:
        ranks = [int(r) for r in server_argv[server_argv.index("--dummy-ranks") + 1].split(",")]
        return str(ranks[0]) if len(set(ranks)) == 1 else f"{min(ranks)}-{max(ranks)}"
    return "as loaded"


def _sweep_counts(args, adapters: list[str]) -> list[int]:
    if not args.sweep_adapters:
        return [min(args.num_adapters, len(adapters)) if args.num_adapters else len(adapters)]
    counts = [int(x) for x in args.sweep_adapters.split(",")]
    if any(not 0 <= n <= len(adapters) for n in counts):
        raise SystemExit(f"--sweep-adapters {args.sweep_adapters}: the server lists "
                         f"{len(adapters)} adapters")
    return counts


def run_sweep(args, url: str, adapters: list[str], base: str, vocab: int, max_len: int,
              ranks: str, write=lambda rows: None) -> list[dict]:
    """Saturation rows: for each adapter count, offered rates rising until the first-token
    SLO attainment falls below `SWEEP_FLOOR`. A later count starts at the highest rate the
    previous one sustained and steps down while it misses the SLO there, so each count
    brackets its saturation point without re-measuring the light loads."""
    rates = [float(x) for x in args.sweep.split(",")]
    rows: list[dict] = []
    t_start, start = time.perf_counter(), 0
    for n in _sweep_counts(args, adapters):
        pool = adapters[:n]
        wl = argparse.Namespace(**{**vars(args), "num_adapters": 0,
                                   "base_fraction": args.base_fraction if n else 1.0})
        passed: dict[int, bool] = {}
        i = start
        while 0 <= i < len(rates) and i not in passed:
            if args.sweep_budget and time.perf_counter() - t_start > args.sweep_budget:
                print(f"sweep budget of {args.sweep_budget:g} s spent", flush=True)
                return rows
            rate = rates[i]
            trace = make_trace(argparse.Namespace(**{**vars(wl), "rate": rate}), pool, base,
                               vocab, max_len)
            before = server_counters(url)
            recs, wall = drive(url, trace, args.timeout, args.clients)
            server = counter_diff(before, server_counters(url))
            s = summarize(recs, wall, args.slo_ttft)
            rows.append(sweep_row(s, model=base, adapters=n, ranks=ranks if n else "-",
                                  rate=rate) | {"server": server})
            write(rows)
            print(f"{n} adapters, offered {rate:g} req/s: served {s['steady_req_s']:.2f} "
                  f"req/s ({s['throughput_req_s']:.2f} over the whole run), "
                  f"{s['steady_tok_s']:.0f} tok/s, SLO {100 * s['slo_attainment']:.1f}%"
                  f", TTFT p50 {s['ttft_p50_s']:.3f} s p99 {s['ttft_p99_s']:.3f} s, TPOT "
                  f"{1000 * s['tpot_mean_s']:.1f} ms; {step_summary(server)}", flush=True)
            passed[i] = s["slo_attainment"] >= SWEEP_FLOOR
            if passed[i] and (i + 1) not in passed:
                i += 1
            elif not passed[i] and i == start and (i - 1) not in passed:
                i -= 1
            else:
                break
        ok = [j for j, good in passed.items() if good]
        start = max(ok) if ok else 0
    return rows


def write_sweep(args, argv, device: str, rows: list[dict], quiet: bool = False) -> str:
    rev = _git()
    commit = rev[:10] + ("-dirty" if rev.endswith("-dirty") else "")
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")
    path = os.path.join(args.out_dir, f"saturation_{slug}_{commit}.json")
    old, commands = [], []
    if os.path.exists(path):
        with open(path) as f:
            prev = json.load(f)
        old, commands = prev["rows"], prev["command"].split(" && ")
    command = " ".join(["benchmarks/serve_load.py"] + argv)
    record = {"benchmark": "saturation", "device": device, "commit": commit,
              "date": datetime.date.today().isoformat(),
              # every run whose rows the file holds, in the order they ran
              "command": " && ".join([c for c in commands if c != command] + [command]),
              "served": SERVED,
              "workload": {k: getattr(args, k) for k in (
                  "alpha", "cv", "duration", "input_range", "output_range", "base_fraction",
                  "slo_ttft", "seed")},
              "rows": merge_rows(old, rows)}
    os.makedirs(args.out_dir, exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
    if quiet:
        return path
    print("\n| model | adapters | ranks | offered req/s | served req/s | SLO % | TTFT p50 s | "
          "TTFT p99 s | TPOT ms |\n|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['adapters']} | {r['ranks']} | {r['offered_req_s']:g} | "
              f"{r['served_req_s']:.2f} | {100 * r['slo_attainment']:.1f} | "
              f"{r['ttft_p50_s']:.3f} | {r['ttft_p99_s']:.3f} | {r['tpot_ms']:.1f} |")
    print(f"wrote {path}")
    return path


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, server_argv = build_parser().parse_known_args(argv)
    if args.quick:
        for k, v in _QUICK.items():
            if getattr(args, k) == build_parser().get_default(k):
                setattr(args, k, v)
        if not args.url and not {"--dummy", "--model"} & set(server_argv):
            server_argv = list(_QUICK_SERVER) + server_argv
    if not args.url and not server_argv:
        build_parser().error("give --url, --quick, or server flags (--dummy/--model ...)")

    server = None
    device = "remote"
    if args.url:
        url = args.url.rstrip("/")
    else:
        server = ServerProcess(server_argv, log_level="info" if args.server_log else "warning",
                               log_path=args.server_log).__enter__()
        url = server.url
        device = device_name()
        print(f"server up in {server.start_s:.1f} s at {url}", flush=True)
    try:
        import httpx
        models = httpx.get(f"{url}/v1/models", timeout=30).json()["data"]
        base = next(m for m in models if m.get("parent") is None)
        adapters = [m["id"] for m in models if m.get("parent") is not None]
        vocab = int(base.get("vocab_size") or 100)
        max_len = int(base.get("max_model_len") or 2048)
        if args.sweep:
            rows = run_sweep(args, url, adapters, base["id"], vocab, max_len,
                             _ranks_label(args, server_argv),
                             write=lambda rows: write_sweep(args, argv, device, rows, True))
            write_sweep(args, argv, device, rows)
            return 0
        reqs = make_trace(args, adapters, base["id"], vocab, max_len)
        print(f"{len(reqs)} requests over {len(set(r.adapter for r in reqs))} adapters "
              f"(of {len(adapters)}), {args.rate} req/s, cv {args.cv}, alpha {args.alpha}",
              flush=True)
        before = server_counters(url)
        recs, wall = drive(url, reqs, args.timeout, args.clients)
        after = server_counters(url)
    finally:
        if server is not None:
            server.__exit__(None, None, None)
    summary = summarize(recs, wall, args.slo_ttft)
    print_table(summary)
    import jax
    record = {
        "benchmark": "serve_load", "time": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.argv[0])] + argv), "device": device,
        "host": platform.node(), "jax": jax.__version__, "git": _git(), "url": url,
        "workload": {k: getattr(args, k) for k in ("num_adapters", "alpha", "rate", "cv",
                                                   "duration", "num_requests", "input_range",
                                                   "output_range", "base_fraction", "seed")},
        "server_args": server_argv, "summary": summary,
        "server_counters": counter_diff(before, after),
        "first_errors": [r.error for r in recs if r.error][:5],
    }
    os.makedirs(args.out_dir, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    tag = f"_{args.tag}" if args.tag else ""
    path = os.path.join(args.out_dir, f"serve_load{tag}_{stamp}.json")
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
