"""What the serving loop adds to the step: one decode-heavy trace, timed three ways.

    (a) step    the decode step alone at the running batch (benchmarks/e2e_decode.py, CUPTI)
    (b) engine  the `Engine` driven in-process by asyncio clients, no HTTP
    (c) http    `slora-jax serve` (HTTP server and engine core) with streaming HTTP clients

each base only and with N adapters (power-law popularity). (b) and (c) report the mean time
per output token of a request (TPOT: from its first to its last token, over its tokens
after the first), the figure a streaming user sees; (a) is the floor both approach. Each
phase runs in its own process, so the device memory of one is free for the next. A first
phase, `startup`, starts the real server twice with the N dummy adapters preloaded: with an
empty compilation cache (cold start), then with the cache that made (warm start), each
timed from launch to the first `/health` 200, with the server's own phase times
(`slora_startup_seconds` from `/metrics`).

    # GPU (one device call, under 10 minutes):
    python benchmarks/serve_overhead.py --dummy llama-7b --config configs/server/llama-7b-bench.yaml
    # CPU smoke run (tiny preset):
    python benchmarks/serve_overhead.py --quick

The result file is written after every phase, so a run cut short keeps what it measured; a
run of some phases (`--skip`) keeps an earlier run's figures for the others at the same
commit, and its `command` says so. Prints a table and writes
benchmarks/results/serving_overhead_<device>_<commit>.json with
`device`, `commit`, `command`, `date`, `rows` ({"adapters", "batch", "step_ms", "engine_ms",
"http_tpot_ms"}) and the start-up times (`start_s`, `startup_phases_s`).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_HERE = os.path.dirname(os.path.abspath(__file__))
for p in (_ROOT, _HERE):
    if p not in sys.path:
        sys.path.insert(0, p)

from server_process import ServerProcess, device_name  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dummy", default="llama-7b", help="model preset (random weights)")
    p.add_argument("--config", default=os.path.join(_ROOT, "configs", "server",
                                                    "llama-7b-bench.yaml"))
    p.add_argument("--adapters", type=int, default=1000, help="N of the adapter rows")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--batch", type=int, default=128, help="running batch of the trace")
    p.add_argument("--context", type=int, default=512, help="context of the step-alone row")
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--input-range", default="8,32")
    p.add_argument("--output-range", default="480,512")
    p.add_argument("--alpha", type=float, default=1.0, help="power-law popularity exponent")
    p.add_argument("--skip", default="", help="phases to skip: comma list of startup,step,engine,http")
    p.add_argument("--quick", action="store_true", help="CPU smoke run: tiny preset, 24 requests")
    p.add_argument("--out", default=os.path.join(_HERE, "results"))
    p.add_argument("--phase", help=argparse.SUPPRESS)            # internal: run one phase
    p.add_argument("--cache-dir", help="compilation cache the servers share, kept afterwards "
                   "(default: a fresh temporary one, so that `startup` measures a cold start; "
                   "with a kept one, a rerun's `http` phase starts warm)")
    return p


def _quick(args) -> None:
    args.dummy, args.config = "tiny", os.path.join(_ROOT, "configs", "server", "tiny.yaml")
    args.adapters, args.batch, args.context, args.num_requests = 20, 16, 64, 24
    args.input_range, args.output_range = "4,16", "24,32"


def _trace(args, n_adapters: int, vocab: int, seed: int) -> list[tuple[str | None, list[int], int]]:
    rng = np.random.default_rng(seed)
    (ilo, ihi), (olo, ohi) = (tuple(int(x) for x in r.split(","))
                              for r in (args.input_range, args.output_range))
    out = []
    for _ in range(args.num_requests):
        ad = None if not n_adapters else f"lora-{int(rng.power(args.alpha) * n_adapters) % n_adapters}"
        out.append((ad, [int(x) for x in rng.integers(3, vocab, int(rng.integers(ilo, ihi)))],
                    int(rng.integers(olo, ohi))))
    return out


def _serve_flags(args, n_adapters: int, cache: str) -> list[str]:
    return ["--dummy", args.dummy, "--config", args.config, "--dummy-adapters", str(n_adapters),
            "--dummy-ranks", str(args.rank), "--preload", "--compile-cache", cache,
            "--max-batch", str(args.batch), "--ttft-slo", "100000", "--log-level", "warning"]


def _tpot_ms(spans: list[tuple[float, float, int]]) -> float:
    """Mean over requests of (last - first token time) / (tokens - 1), in ms."""
    xs = [(t1 - t0) / (n - 1) for t0, t1, n in spans if n > 1]
    return 1000 * float(np.mean(xs)) if xs else float("nan")


# --- phase (b): the engine in this process ---------------------------------------------

def phase_engine(args) -> dict:
    from serving.bootstrap import build, build_parser as serve_parser, warm
    from serving.requests import GenerationRequest
    from slora_jax.batching import Sampling
    t0 = time.perf_counter()
    engine, _, _, _ = build(serve_parser().parse_args(_serve_flags(args, args.adapters,
                                                                   args.cache_dir)))
    warm(engine, progress=False)
    start_s = time.perf_counter() - t0
    engine.start()
    out = {"start_s": start_s}

    async def one(req) -> tuple[float, float, int]:
        n, first = 0, None
        async for o in engine.generate(req):
            n += len(o.token_ids)
            if first is None:
                first = time.perf_counter()
        return first, time.perf_counter(), n

    async def run(trace):
        reqs = [GenerationRequest(prompt=p, adapter=a, max_tokens=m, sampling=Sampling(),
                                  ttft_slo_s=None) for a, p, m in trace]
        return await asyncio.gather(*(one(r) for r in reqs))

    def steps() -> dict[str, float]:
        return {k: engine.metrics.steps.labels(kind=k)._value.get() for k in ("prefill", "decode")}

    for n in (0, args.adapters):
        t0, s0 = dict(engine.clock.totals), steps()
        spans = asyncio.run(run(_trace(args, n, engine.mc.vocab_size, seed=n)))
        out[str(n)] = _tpot_ms(spans)
        s1 = steps()
        n_steps = sum(s1.values()) - sum(s0.values())
        # Where the engine thread's time went, per step (section timers of the loop).
        out[f"sections_{n}"] = {k: 1000 * (v - t0.get(k, 0.0)) / max(1, n_steps)
                                for k, v in engine.clock.totals.items()}
        out[f"steps_{n}"] = {k: s1[k] - s0[k] for k in s1}
        print(f"engine adapters={n}: {out[str(n)]:.2f} ms per output token; steps "
              f"{out[f'steps_{n}']}; ms per step by section: "
              + ", ".join(f"{k} {v:.2f}" for k, v in out[f"sections_{n}"].items()), flush=True)
    engine.shutdown()
    return out


# --- phase (c): the HTTP server ---------------------------------------------------------------

def _Server(args, cache: str, log_level: str = "warning") -> ServerProcess:
    return ServerProcess(_serve_flags(args, args.adapters, cache), log_level=log_level)


def phase_startup(args) -> dict:
    """Cold start (the cache dir is empty) then warm start, of the real server."""
    out = {}
    for label in ("cold", "warm"):
        with _Server(args, args.cache_dir, log_level="info") as srv:
            out[label] = {"wall_s": srv.start_s, "phases_s": srv.startup_phases()}
            for line in srv.log_lines("start-up:|compiled every|adapters in host"):
                print("  " + line.split(" INFO ")[-1], flush=True)
        print(f"start-up {label}: {out[label]['wall_s']:.1f} s to /health; server phases: "
              + ", ".join(f"{k} {v:.1f}" for k, v in out[label]["phases_s"].items()), flush=True)
    return out


def phase_http(args) -> dict:
    import httpx

    import serve_load
    with _Server(args, args.cache_dir) as srv:
        url, out = srv.url, {"start_s": srv.start_s}
        vocab = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["vocab_size"]
        base = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
        for n in (0, args.adapters):
            reqs = [serve_load.Req(i, 0.0, a or base, p, m) for i, (a, p, m)
                    in enumerate(_trace(args, n, vocab, seed=n))]
            recs, wall = serve_load.drive(url, reqs, 600, serve_load.default_clients())
            bad = [r.error for r in recs if r.error]
            if bad:
                raise SystemExit(f"{len(bad)} requests failed: {bad[:3]}")
            s = serve_load.summarize(recs, wall, 1e9)
            out[str(n)] = 1000 * s["tpot_mean_s"]
            print(f"http adapters={n}: {out[str(n)]:.2f} ms per output token "
                  f"({s['throughput_req_s']:.2f} req/s)", flush=True)
    return out


# --- phase (a): the step alone -----------------------------------------------------------------

def phase_step(args) -> dict:
    with tempfile.TemporaryDirectory() as d:
        backend = "pallas" if not args.quick else "reference"
        n_distinct = min(args.batch, args.adapters)
        cmd = [sys.executable, os.path.join(_HERE, "e2e_decode.py"), "--preset", args.dummy,
               "--batches", f"{args.batch}:{args.context}", "--adapters", f"1,{n_distinct}",
               "--ranks", str(args.rank), "--iters", "3" if args.quick else "10",
               "--lora-backend", backend, "--attention-backend", backend, "--out", d]
        subprocess.run(cmd, cwd=_ROOT, check=True, stdout=subprocess.DEVNULL)
        res = json.load(open(next(os.path.join(d, f) for f in os.listdir(d)
                                  if f.endswith(".json"))))
    rows = {r["distinct_adapters"]: r for r in res["rows"]}
    out = {"0": rows[1]["base_us"] / 1000, str(args.adapters): rows[n_distinct]["slora_us"] / 1000,
           "distinct": n_distinct}
    print(f"step B={args.batch} ctx {args.context}: base {out['0']:.2f} ms, LoRA over "
          f"{n_distinct} adapters {out[str(args.adapters)]:.2f} ms", flush=True)
    return out


# --- the driver ------------------------------------------------------------------------------

def _run_phase(name: str, argv: list[str], cache: str) -> dict:
    """Run one phase in a process of its own, echoing its lines as they come; its result is
    the last JSON line it prints."""
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--phase", name, "--cache-dir", cache]
    result = None
    with subprocess.Popen(cmd, cwd=_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as proc:
        # stderr (progress bars, logs) is drained on a thread so that neither pipe fills
        err: list[str] = []
        drain = threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True)
        drain.start()
        for line in proc.stdout:
            if line.startswith("{"):
                result = line
            else:
                print(line.rstrip("\n"), flush=True)
        proc.wait()
        drain.join(5)
    if proc.returncode or result is None:
        sys.stderr.write("".join(err)[-4000:])
        raise SystemExit(f"phase {name} failed ({proc.returncode})")
    return json.loads(result)


def _fill(new, old):
    """`new` with its missing (None) values taken from `old`, recursively."""
    if new is None:
        return old
    if isinstance(new, dict) and isinstance(old, dict):
        return {**old, **{k: _fill(v, old.get(k)) for k, v in new.items()}}
    if isinstance(new, list) and isinstance(old, list) and len(new) == len(old):
        return [_fill(a, b) for a, b in zip(new, old)]
    return new


def _commit() -> str:
    if os.environ.get("SLORA_COMMIT"):
        return os.environ["SLORA_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], cwd=_ROOT,
                              capture_output=True, text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


PHASES = ("startup", "step", "engine", "http")


def _record(args, argv, res: dict) -> tuple[str, dict]:
    """The result file's path and contents from the phases in `res`; phases this run did not
    measure keep an earlier run's figures at the same commit (the command says which)."""
    rows = []
    for n in (0, args.adapters):
        row = {"adapters": n, "batch": args.batch}
        for key, phase in (("step_ms", "step"), ("engine_ms", "engine"), ("http_tpot_ms", "http")):
            row[key] = res.get(phase, {}).get(str(n))
        rows.append(row)
    device, commit = device_name(), _commit()
    record = {"benchmark": "serve_overhead", "device": device, "commit": commit,
              "date": datetime.date.today().isoformat(),
              "command": " ".join(["benchmarks/serve_overhead.py", *argv]),
              "workload": {"model": args.dummy, "config": os.path.relpath(args.config, _ROOT),
                           "rank": args.rank, "num_requests": args.num_requests,
                           "input_range": args.input_range, "output_range": args.output_range,
                           "alpha": args.alpha, "step_context": args.context},
              "start_s": {k: res.get("startup", {}).get(k, {}).get("wall_s")
                          for k in ("cold", "warm")},
              "startup_phases_s": {k: res.get("startup", {}).get(k, {}).get("phases_s")
                                   for k in ("cold", "warm")},
              "rows": rows,
              "engine_sections_ms_per_step": {str(n): res.get("engine", {}).get(f"sections_{n}")
                                              for n in (0, args.adapters)},
              "engine_steps": {str(n): res.get("engine", {}).get(f"steps_{n}")
                               for n in (0, args.adapters)}}
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")
    path = os.path.join(args.out, f"serving_overhead_{slug}_{commit}.json")
    others = [p for p in PHASES if p not in res]
    if others and os.path.exists(path):       # phases split over runs: keep the others' figures
        with open(path) as f:
            old = json.load(f)
        record = _fill(record, old)
        base = old["command"].split(" (with ")[0]
        record["command"] = (old["command"] if base == record["command"] else
                             f"{record['command']} (with {', '.join(others)} from: {base})")
    return path, record


def _print_table(args, record: dict, path: str) -> None:
    fmt = lambda x: "-" if x is None else f"{x:.2f}"
    print(f"\nserving overhead, {args.dummy}, {record['device']}, commit {record['commit']}")
    print("| adapters | batch | step ms | engine ms/token | http ms/token | http/step | "
          "engine/step |")
    print("|---|---|---|---|---|---|---|")
    for r in record["rows"]:
        ratio = lambda a: (fmt(r[a] / r["step_ms"]) if r[a] is not None and r["step_ms"]
                           else "-")
        print(f"| {r['adapters']} | {r['batch']} | {fmt(r['step_ms'])} | {fmt(r['engine_ms'])} | "
              f"{fmt(r['http_tpot_ms'])} | {ratio('http_tpot_ms')} | {ratio('engine_ms')} |")
    st = record["start_s"]
    print(f"start-up to /health with {args.adapters} dummy adapters: cold {fmt(st['cold'])} s, "
          f"warm {fmt(st['warm'])} s")
    print(f"wrote {os.path.relpath(path, _ROOT)}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.quick:
        _quick(args)
    if args.phase:
        fn = {"startup": phase_startup, "step": phase_step, "engine": phase_engine,
              "http": phase_http}[args.phase]
        print(json.dumps(fn(args)), flush=True)
        return 0
    skip = set(filter(None, args.skip.split(",")))
    if skip - set(PHASES):
        build_parser().error(f"--skip: unknown phases {sorted(skip - set(PHASES))}")
    cache = args.cache_dir or tempfile.mkdtemp(prefix="slora-jax-cache-")
    os.makedirs(args.out, exist_ok=True)
    res: dict = {}
    path = record = None
    try:
        for name in PHASES:
            if name not in skip:
                t = time.perf_counter()
                res[name] = _run_phase(name, argv, cache)
                print(f"[{name}: {time.perf_counter() - t:.0f} s]", flush=True)
                # Written after every phase: a run cut short keeps what it measured.
                path, record = _record(args, argv, res)
                with open(path, "w") as f:
                    json.dump(record, f, indent=1)
    finally:
        if not args.cache_dir:
            shutil.rmtree(cache, ignore_errors=True)
    if record is not None:
        _print_table(args, record, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
