"""The scheduler: which requests run in the next device step, and their pages.

Host-only and single-threaded (the engine thread calls it); it never touches
device arrays, so it is tested without compiling anything.

Policy (iteration-level continuous batching with chunked prefill, Sarathi-Serve style):

* A step is either a **decode** step (every running request whose prompt is in the
  pool, one token each) or a **prefill** step: the same decode rows plus prefill
  chunks of up to `max_prefill_tokens` tokens and `max_prefill_requests` requests
  in all, so admitting requests never stalls the running ones. A prompt longer
  than the budget is cut: its first chunk takes what is left of it, the rest goes in
  the next prefill steps (first in each, as the step's continued prompt; one
  prompt is continued at a time), each chunk attending to the earlier ones in the
  pool; its first token is sampled by the last chunk.
* A prefill step is chosen when there is prefill work (a continued prompt, or a
  request that can be admitted) and at least `decode_steps_per_prefill` decode
  steps ran since the last one (0: every step carries prefill work while there is
  some, which keeps the prefill rate, hence throughput, highest).
* **Admission** is first-come first-served on memory: a request is admitted
  when the pool can hold its prompt's KV pages (its first chunk's, for a prompt
  prefilled in chunks; all of `prompt + max_tokens` with
  `kv_pages: reserve`) and its adapter (resident already, or free pages plus
  pages of idle adapters that can be evicted). If the head of the queue does not
  fit, nothing behind it is admitted (no starvation of long requests). A request
  whose adapter is still being read from disk is skipped over without blocking
  the queue; its adapter loads meanwhile.
* **KV pages on demand** (`kv_pages: on_demand`, the default): a running request
  takes a page when it crosses one (`_grow`, before every step, oldest first), and
  a prompt continued in chunks takes each chunk's pages when the chunk is scheduled
  (`_grow_to`; if the pool cannot give them, the chunk waits and the decode rows
  go on, preempting the prompt if they need its pages).
  When the pool has none left (idle adapters evicted first), the most recently
  admitted request is preempted: its pages return at once, its step in flight is
  made stale (an epoch), and it goes back to the head of the queue, to be
  recomputed from its prompt plus the tokens it already streamed (never streamed
  twice; sampling keys depend on position, so its output is unchanged).
* **Early abort** (S-LoRA's admission control): a queued request whose
  first-token deadline has passed, or will pass before its estimated prefill
  (the prefill steps that the prompts ahead of it and its own need, by count and by
  tokens, times the measured step time), is dropped with an error so that the
  requests behind it still meet theirs.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import time
from typing import Any, Callable

import numpy as np

from serving.adapter_store import AdapterEntry, AdapterStore, PendingLoad
from serving.requests import (AdapterLoadFailed, GenerationRequest, InvalidRequest, RequestError,
                              SloAbort)
from slora_jax.allocator import PageAllocator, kv_used_elems
from slora_jax.config import EngineConfig
from slora_jax.pool import PoolLayout


_uids = itertools.count()


@dataclasses.dataclass(eq=False)
class Seq:
    """A request inside the engine."""
    req: GenerationRequest
    stream: Any
    entry: AdapterEntry | None
    arrival: float
    deadline: float | None
    state: str = "new"             # new | waiting | running | done
    kv_pages: np.ndarray | None = None
    row: int = -1                  # this request's row in the device-side token buffer
    n_dispatched: int = 0          # tokens whose step has been dispatched
    n_out: int = 0                 # tokens read back and delivered
    t_first: float | None = None
    uid: int = dataclasses.field(default_factory=lambda: next(_uids))
    generated: list[int] = dataclasses.field(default_factory=list)   # the delivered tokens
    epoch: int = 0                 # +1 per preemption: older steps' tokens are stale
    on_demand: bool = False        # KV pages taken as it grows (it can be recomputed)
    n_prefilled: int = 0           # tokens of `prefill_tokens` whose prefill is dispatched
    prefill_target: int = 0        # its prefill's length, fixed at admission

    @property
    def prompt_len(self) -> int:
        return len(self.req.prompt)

    @property
    def prefill_tokens(self) -> list[int]:
        """What its (next) prefill runs: the prompt, then what it generated before a
        preemption (recomputed, never streamed twice)."""
        return list(self.req.prompt) + self.generated

    @property
    def prefill_len(self) -> int:
        return self.prompt_len + len(self.generated)

    @property
    def prefilled(self) -> bool:
        return self.n_prefilled >= self.prefill_target

    @property
    def kv_owner(self) -> tuple:
        return ("kv", self.uid)


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    max_queue: int = 1024                 # waiting requests before new ones get 429
    decode_steps_per_prefill: int = 0     # decode steps between prefill steps (0: none)
    ttft_slo_s: float | None = None       # first-token SLO for early abort; None = off
    predictive_abort: bool = True         # abort when the estimate (not only the clock) misses
    prefetch_depth: int = 16              # queued requests whose adapters are prefetched
    admit_window: int = 64                # queued requests scanned per admission
    base_only_steps: bool = True          # batches without adapters run a step with no LoRA
    # KV pages: "on_demand" takes them as a sequence grows and, when the pool runs dry,
    # preempts the youngest request (recomputed later from its prompt and tokens so far);
    # "reserve" takes prompt + max_tokens at admission.
    kv_pages: str = "on_demand"

    def __post_init__(self):
        if self.kv_pages not in ("on_demand", "reserve"):
            raise ValueError(f"kv_pages: {self.kv_pages!r} is not one of on_demand, reserve")
        if not (isinstance(self.decode_steps_per_prefill, int)
                and self.decode_steps_per_prefill >= 0):
            raise ValueError(f"decode_steps_per_prefill: {self.decode_steps_per_prefill!r} is "
                             "not an integer >= 0")


@dataclasses.dataclass(frozen=True)
class Chunk:
    """Tokens [start, end) of a request's `prefill_tokens`, prefilled in one step."""
    seq: Seq
    start: int
    end: int

    @property
    def last(self) -> bool:
        """Whether it ends the prompt (its step samples the request's next token)."""
        return self.end == self.seq.prefill_target


@dataclasses.dataclass
class Step:
    kind: str                 # "prefill" (chunks, and decode rows) | "decode"
    seqs: list[Seq]           # the decode rows
    loads: list[PendingLoad]
    chunks: list[Chunk] = dataclasses.field(default_factory=list)


class Scheduler:
    def __init__(self, ec: EngineConfig, layout: PoolLayout, cfg: SchedulerConfig,
                 allocator: PageAllocator, store: AdapterStore,
                 on_fail: Callable[[Seq, RequestError], None]):
        self.ec, self.layout, self.cfg = ec, layout, cfg
        self.allocator, self.store, self.on_fail = allocator, store, on_fail
        self.waiting: collections.deque[Seq] = collections.deque()
        self.running: list[Seq] = []
        self._free_rows = list(range(ec.max_batch - 1, -1, -1))
        self.dump_row = ec.max_batch
        self._adapters_running: collections.Counter[AdapterEntry] = collections.Counter()
        self.decodes_since_prefill = 0
        self.ema_prefill = 0.0     # seconds per step, measured by the engine
        self.ema_decode = 0.0
        self.kv_pages_used = 0
        self._n_deadlines = 0      # queued requests with a first-token deadline
        self.preemptions = 0

    def kv_pages_for(self, req: GenerationRequest) -> int:
        """KV pages of the whole request: what "reserve" takes, and the most it can hold."""
        return self.layout.kv_pages_for(len(req.prompt) + req.max_tokens)

    def _can_recompute(self, seq: Seq) -> bool:
        return self.cfg.kv_pages == "on_demand"

    def _admission_pages(self, seq: Seq, budget: int | None = None) -> int:
        """KV pages taken at admission: those of its first prefill chunk (of at most
        `budget` tokens; later chunks take theirs as they are scheduled), or the whole
        request's."""
        if self._can_recompute(seq):
            n = seq.prefill_len if budget is None else min(seq.prefill_len, budget)
            return self.layout.kv_pages_for(n)
        return self.kv_pages_for(seq.req)

    # -- queue ------------------------------------------------------------------------
    def add(self, seq: Seq, front: bool = False) -> None:
        seq.state = "waiting"
        if front:
            self.waiting.appendleft(seq)
        else:
            self.waiting.append(seq)
        self._n_deadlines += seq.deadline is not None
        if seq.entry is not None:
            self.store.want(seq.entry)

    def _leave_queue(self, seq: Seq) -> None:
        self.waiting.remove(seq)
        self._n_deadlines -= seq.deadline is not None
        if seq.entry is not None:
            self.store.unwant(seq.entry)

    def fail(self, seq: Seq, err: RequestError) -> None:
        if seq.state == "waiting":
            self._leave_queue(seq)
        elif seq.state == "running":
            self._release(seq)
        seq.state = "done"
        self.on_fail(seq, err)

    def cancel(self, seq: Seq) -> None:
        """Drop a request now; a running one's pages return to the pool at once."""
        if seq.state == "waiting":
            self._leave_queue(seq)
        elif seq.state == "running":
            self._release(seq)
        seq.state = "done"

    def finish(self, seq: Seq) -> None:
        if seq.state == "running":
            self._release(seq)
        seq.state = "done"

    def _release(self, seq: Seq) -> None:
        # Other threads read `running` and the page counts without a lock (Engine.stats):
        # the pages go first, so whoever sees the request gone sees its pages free.
        self.kv_pages_used -= self.allocator.free(seq.kv_owner)
        self._free_rows.append(seq.row)
        if seq.entry is not None:
            self._adapters_running[seq.entry] -= 1
            if not self._adapters_running[seq.entry]:
                del self._adapters_running[seq.entry]
            self.store.unpin(seq.entry)
        self.running.remove(seq)

    # -- early abort ------------------------------------------------------------------------
    def abort_late(self, now: float) -> None:
        if not self._n_deadlines:
            return
        per_prefill = self.ema_prefill + (self.cfg.decode_steps_per_prefill * self.ema_decode
                                          if self.running else 0.0)
        # Prefill steps until a queued request's prompt is in: each takes at most
        # max_prefill_requests prompts and max_prefill_tokens tokens, the continued
        # prompt's rest first.
        cont = self._continued()
        tokens = cont.prefill_target - cont.n_prefilled if cont is not None else 0
        budget = self.ec.max_prefill_tokens
        i = 0
        for seq in list(self.waiting):
            tokens += seq.prefill_len
            if seq.deadline is not None:
                steps = max(i // self.ec.max_prefill_requests + 1, -(-tokens // budget))
                ahead = steps * per_prefill
                est = now + (ahead if self.cfg.predictive_abort else 0.0)
                if est > seq.deadline:
                    slo = seq.deadline - seq.arrival
                    self.fail(seq, SloAbort(
                        f"request dropped: it cannot get its first token within the "
                        f"{slo:.3g}s SLO (queued {now - seq.arrival:.3g}s, estimated "
                        f"{ahead:.3g}s more)"))
                    tokens -= seq.prefill_len
                    continue
            i += 1

    # -- the next step -------------------------------------------------------------------
    def schedule(self, now: float | None = None) -> Step | None:
        decodable = self._grow([s for s in self.running
                                if s.prefilled and s.n_dispatched < s.req.max_tokens])
        if (self.waiting or self._continued() is not None) and (
                not decodable or self.decodes_since_prefill >= self.cfg.decode_steps_per_prefill):
            chunks, loads = self._prefill_chunks()
            if chunks:
                self.decodes_since_prefill = 0
                return Step("prefill", decodable, loads, chunks)
        if decodable:
            self.decodes_since_prefill += 1
            return Step("decode", decodable, [])
        return None

    def _continued(self) -> Seq | None:
        """The running request whose prompt is part way through its prefill, if any."""
        return next((s for s in self.running if not s.prefilled), None)

    def _prefill_chunks(self) -> tuple[list[Chunk], list[PendingLoad]]:
        """The step's prefill work: the continued prompt's next chunk first (a chunk
        continues only as a step's first prompt), then newly admitted requests'."""
        budget = self.ec.max_prefill_tokens
        chunks: list[Chunk] = []
        cont = self._continued()
        if cont is not None:
            end = min(cont.prefill_target, cont.n_prefilled + budget)
            if not self._grow_to(cont, end):
                return [], []        # it waits for pages (decode rows free them, or preempt it)
            chunks.append(Chunk(cont, cont.n_prefilled, end))
            budget -= end - cont.n_prefilled
        may_cut = cont is None or chunks[0].last     # one prompt is continued at a time
        loads = self._admit(chunks, budget, may_cut)
        return chunks, loads

    def _grow(self, decodable: list[Seq]) -> list[Seq]:
        """Give each request the KV page its next decode step writes into, oldest first;
        when the pool has none, preempt the youngest on-demand request (itself included)."""
        out = []
        for seq in decodable:                      # `running` is in admission order
            if seq.state != "running":
                continue                           # preempted for an older one
            need = self.layout.kv_pages_for(seq.prompt_len + seq.n_dispatched) - len(seq.kv_pages)
            if need > 0:
                while (self.allocator.num_free + self.store.evictable_pages() < need
                       and self._preempt_youngest()):
                    pass
                if seq.state != "running":
                    continue
                self._extend(seq, need, seq.prompt_len + seq.n_dispatched)
            out.append(seq)
        return out

    def _grow_to(self, seq: Seq, n_tokens: int) -> bool:
        """The pages of a chunked prompt's first `n_tokens`; False if the pool cannot."""
        need = self.layout.kv_pages_for(n_tokens) - len(seq.kv_pages)
        if need > 0:
            if self.allocator.num_free + self.store.evictable_pages() < need:
                return False
            self._extend(seq, need, n_tokens)
        return True

    def _extend(self, seq: Seq, need: int, n_tokens: int) -> None:
        """`need` more KV pages for `seq`, which then holds `n_tokens` tokens."""
        self.store.make_room(need)
        seq.kv_pages = np.concatenate([seq.kv_pages, self.allocator.alloc(
            seq.kv_owner, need, "kv")])
        self.kv_pages_used += need
        self.allocator.set_used(seq.kv_owner, kv_used_elems(n_tokens, self.layout))

    def _preempt_youngest(self) -> bool:
        """Preempt the most recently admitted on-demand request; False if there is none."""
        victim = next((s for s in reversed(self.running) if s.on_demand), None)
        if victim is None:
            return False
        self._release(victim)
        victim.epoch += 1    # the step in flight delivers nothing to it, even if it is
                             # re-admitted (and running again) before that step is read back
        victim.n_dispatched = victim.n_out
        victim.n_prefilled = 0
        victim.kv_pages = None
        if victim.n_out:                 # its first token is out: no first-token deadline
            victim.deadline = None
        self.add(victim, front=True)     # first in line again
        self.preemptions += 1
        return True

    def _admit(self, chunks: list[Chunk], budget: int, may_cut: bool) -> list[PendingLoad]:
        """Admit queued requests into `chunks` within `budget` prefill tokens; the last
        one admitted may be cut (its prompt continued in later steps) if `may_cut`."""
        ec, store, alloc = self.ec, self.store, self.allocator
        loads: list[PendingLoad] = []
        distinct = set(self._adapters_running)
        failed_entries = set()
        for seq in list(itertools.islice(self.waiting, self.cfg.admit_window)):
            # Only a prompt longer than a whole step's budget is cut; one that would fit
            # waits for the next step (a step continuing a prompt costs a gather per layer).
            if (len(chunks) == ec.max_prefill_requests or not self._free_rows or budget <= 0
                    or (seq.prefill_len > budget
                        and not (may_cut and seq.prefill_len > ec.max_prefill_tokens))):
                break
            e = seq.entry
            if e is not None:
                if e.error is not None:
                    failed_entries.add(e)
                    self.fail(seq, AdapterLoadFailed(e.error))
                    continue
                if e.slot is None and e.host is None:
                    store.request_host(e)          # I/O-bound: let the others go ahead
                    continue
                if e not in distinct and len(distinct) >= ec.max_adapters_per_batch:
                    continue
            need_kv = self._admission_pages(seq, budget)
            need_ad = store.pages_needed(e) if e is not None else 0
            if (full := self.kv_pages_for(seq.req)) + need_ad > alloc.capacity:
                self.fail(seq, InvalidRequest(
                    f"the request needs {full} KV pages and {need_ad} adapter pages, more than "
                    f"the pool's {alloc.capacity}; lower max_tokens or the prompt length",
                    "max_tokens"))
                continue
            # Headroom of a page per running request, so that admitting does not make
            # the next decode step preempt at once.
            headroom = len(self.running) if self.cfg.kv_pages == "on_demand" else 0
            if alloc.num_free + store.evictable_pages(exclude=e) < need_kv + need_ad + headroom:
                break                               # first come, first served on memory
            if e is not None:            # pinned before it leaves the queue: its host copy stays
                store.pin(e)
                load = store.make_resident(e)
                if load is not None:
                    loads.append(load)
                self._adapters_running[e] += 1
                distinct.add(e)
            store.make_room(need_kv)
            seq.kv_pages = alloc.alloc(seq.kv_owner, need_kv, "kv")
            seq.on_demand = self._can_recompute(seq)
            alloc.set_used(seq.kv_owner, kv_used_elems(
                min(seq.prefill_len, budget) if seq.on_demand
                else seq.prompt_len + seq.req.max_tokens, self.layout))
            self.kv_pages_used += need_kv
            seq.row = self._free_rows.pop()
            self.running.append(seq)     # running before it leaves the queue: never neither
            self._leave_queue(seq)
            seq.state = "running"
            seq.n_prefilled, seq.prefill_target = 0, seq.prefill_len
            chunks.append(Chunk(seq, 0, min(seq.prefill_len, budget)))
            budget -= chunks[-1].end
            if not chunks[-1].last:
                break                    # the budget is spent on a prompt to continue
        for e in failed_entries:
            store.clear_error(e)
        return loads

    # -- prefetch -----------------------------------------------------------------------------
    def prefetch(self) -> list[PendingLoad]:
        """Start host loads for the head of the queue, and copy ready adapters into free pages.

        A pool prefetch only takes pages that are free beyond the KV needs of
        the requests ahead; it never evicts. The prefetched adapter is idle
        (evictable) until its request is admitted.
        """
        loads = []
        reserve = 0
        for seq in itertools.islice(self.waiting, self.cfg.prefetch_depth):
            reserve += self._admission_pages(seq)
            e = seq.entry
            if e is None or e.slot is not None:
                continue
            if e.host is None:
                self.store.request_host(e)
            elif self.allocator.num_free - reserve >= e.host.n_pages:
                loads.append(self.store.make_resident(e, evict=False))
        return loads

    def observe_step(self, kind: str, seconds: float, alpha: float = 0.2) -> None:
        """Step times for early abort's estimates (a prefill step: one with chunks)."""
        if kind == "prefill":
            self.ema_prefill = seconds if not self.ema_prefill else (
                (1 - alpha) * self.ema_prefill + alpha * seconds)
        else:
            self.ema_decode = seconds if not self.ema_decode else (
                (1 - alpha) * self.ema_decode + alpha * seconds)


def now() -> float:
    return time.monotonic()
