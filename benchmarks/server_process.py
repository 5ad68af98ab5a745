"""The real server as a subprocess for the serving benchmarks, and what its `/metrics`
say about a run: `python -m serving.server` on a free port, up once `/health` answers 200;
its counters read before and after a run give that run's steps, tokens, preemptions and
the engine thread's time by section."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def device_name() -> str:
    """The first GPU's name as nvidia-smi gives it (JAX's `device_kind`), else "cpu"."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip()
        if out:
            return out.splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return "cpu"


class ServerProcess:
    """`python -m serving.server FLAGS` on a free port; entering returns once /health is
    200 (`start_s` the seconds that took), leaving stops it (SIGTERM, then SIGKILL)."""

    def __init__(self, flags: list[str], log_level: str = "warning",
                 log_path: str | None = None):
        self.port = _free_port()
        self.argv = [sys.executable, "-m", "serving.server", "--port", str(self.port), *flags,
                     "--log-level", log_level]
        self.url = f"http://127.0.0.1:{self.port}"
        self._keep_log = log_path is not None
        self._log_path = log_path

    def __enter__(self) -> "ServerProcess":
        import httpx
        if self._log_path is None:
            fd, self._log_path = tempfile.mkstemp(prefix="slora-server-", suffix=".log")
            os.close(fd)
        os.makedirs(os.path.dirname(os.path.abspath(self._log_path)), exist_ok=True)
        self._log = open(self._log_path, "w")
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(self.argv, cwd=_ROOT, stdout=self._log,
                                     stderr=subprocess.STDOUT)
        try:
            while True:
                if self.proc.poll() is not None:
                    raise SystemExit(f"the server exited ({self.proc.returncode}):\n"
                                     + open(self._log_path).read()[-3000:])
                try:
                    if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        self.start_s = time.perf_counter() - t0
        return self

    def startup_phases(self) -> dict[str, float]:
        """The server's own `slora_startup_seconds{phase}` gauges."""
        import httpx
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        return {m.group(1): float(m.group(2)) for m in re.finditer(
            r'^slora_startup_seconds\{phase="([^"]+)"\} (\S+)$', text, re.M)}

    def log_lines(self, pattern: str) -> list[str]:
        with open(self._log_path) as f:
            return [ln.rstrip() for ln in f if re.search(pattern, ln)]

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()
        if not self._keep_log:
            os.unlink(self._log_path)


def server_counters(url: str) -> dict:
    """The server's cumulative counters (steps by kind, tokens, adapter loads, preemptions,
    the engine thread's time by section): a point's figures are the differences."""
    import httpx
    try:
        text = httpx.get(f"{url}/metrics", timeout=10).text
    except httpx.HTTPError:
        return {}
    out = {}
    for m in re.finditer(r'^(slora_(?:adapter_loads_total|adapter_evictions_total|steps_total|'
                         r'prompt_tokens_total|generation_tokens_total|requests_rejected_total|'
                         r'preemptions|engine_thread_seconds|step_seconds_(?:sum|count))(?:\{[^}]*\})?) (\S+)$', text, re.M):
        out[m.group(1)] = float(m.group(2))
    return out


def counter_diff(before: dict, after: dict) -> dict:
    return {k: round(after[k] - before.get(k, 0.0), 4) for k in after
            if after[k] != before.get(k, 0.0)}


def step_summary(server: dict) -> str:
    """Steps by kind with their mean device time, tokens per step and preemptions, from a
    point's counter differences."""
    parts = []
    for kind in ("decode", "prefill"):
        n = server.get(f'slora_step_seconds_count{{kind="{kind}"}}', 0)
        if n:
            ms = 1000 * server.get(f'slora_step_seconds_sum{{kind="{kind}"}}', 0) / n
            parts.append(f"{int(n)} {kind} steps of {ms:.1f} ms")
    steps = sum(v for k, v in server.items() if k.startswith("slora_steps_total"))
    if steps:
        parts.append(f"{server.get('slora_generation_tokens_total', 0) / steps:.0f} tokens out "
                     f"and {server.get('slora_prompt_tokens_total', 0) / steps:.0f} in per step")
    parts.append(f"{int(server.get('slora_preemptions', 0))} preemptions")
    return ", ".join(parts)
