"""S-LoRA tensor parallelism on fake CPU devices (conftest forces 4).

* tp_prefill / tp_decode give the logits of the single-device step on a mixed
  batch (adapters of different ranks and target sets, and base-only
  requests). Tolerance 1e-4 relative to the logits' scale: both run float32
  with matmul precision "highest"; TP only changes the order of the sums (the
  row-parallel all-reduces, the rank split of the LoRA shrink), observed ~1e-6.
* The collectives are S-LoRA's: per layer, two all-reduces of [T, H] for the
  base, and for LoRA only [T, r]-sized ones (all-gather for the 5
  column-parallel modules, all-reduce for o and down).
* The pool stays donated: every shard aliased, no copy of it in the HLO.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TINY, tiny_engine_config
from sharding.adapters import pack_tp_adapter, shard_adapter, tp_load_adapter_pages, tp_ranks
from sharding.mesh import make_tp_mesh
from sharding.specs import COLUMN_MODULES, ROW_MODULES, init_tp_pool, shard_params
from sharding.tp_step import TPSpec, tp_decode, tp_prefill
from slora_jax.adapters import dummy_adapter
from slora_jax.batching import Sampling, SlotInfo, decode_batch, prefill_batch
from slora_jax.config import MODULES
from slora_jax.model import StepSpec
from slora_jax.params import init_dummy_params
from slora_jax.pool import PoolLayout, init_pool, load_adapter_pages
from slora_jax.step import decode, prefill

# Small buckets keep the compiles short on 2 CPU cores.
EC = tiny_engine_config(num_pages=256, max_rank=8, max_batch=8, max_prefill_tokens=32,
                        max_prefill_requests=8, max_context=32, max_adapters_per_batch=8)
ADAPTERS = [  # rank, targets: attention only, everything, row-parallel only, odd ranks
    (2, ("q", "v")), (8, MODULES), (1, ("o", "down")), (5, ("k", "up")),
    (3, ("gate", "up", "down")),
]
REQ_SLOT = [-1, 0, 1, -1, 2, 3, 4, 1]          # base-only requests mixed in
# gqa has 2 KV heads: N=2 only; MHA at N=2 (the code path of N=4 and of GQA's N=2) is slow
CASES = [pytest.param(("mha", 2), marks=pytest.mark.slow, id="mha-tp2"),
         pytest.param(("mha", 4), id="mha-tp4"), pytest.param(("gqa", 2), id="gqa-tp2")]
DECODE_STEPS = 2
KV_PAGE0 = 200                                 # KV pages above any adapter page


@functools.lru_cache(maxsize=None)
def model(name):
    mc = TINY[name]
    return mc, init_dummy_params(mc, jnp.float32, seed=1, std=0.25)


def adapters(mc):
    return [dummy_adapter(mc, r, mods, seed=10 + i, std=0.3, alpha=2 * r, name=f"a{i}")
            for i, (r, mods) in enumerate(ADAPTERS)]


def scenario():
    rng = np.random.default_rng(0)
    lens = rng.integers(1, 5, len(REQ_SLOT))
    prompts = [list(map(int, rng.integers(0, 90, int(n)))) for n in lens]
    kv = [np.arange(KV_PAGE0 + 4 * i, KV_PAGE0 + 4 * i + 4, dtype=np.int32)
          for i in range(len(REQ_SLOT))]
    return prompts, kv


def load_all(pool, packed, load):
    """Place each adapter's rows in consecutive pages from 1; return pool, slot infos."""
    slots, nxt = [], 1
    for rows, rank, scale, offset in packed:
        pages = np.arange(nxt, nxt + rows.shape[1], dtype=np.int32)
        assert pages[-1] < KV_PAGE0
        nxt += len(pages)
        pool = load(pool, jnp.asarray(pages), jnp.asarray(rows))
        slots.append(SlotInfo(pages=pages, rank=rank, scale=scale, offset=offset))
    return pool, slots


def run(step_prefill, step_decode, params, pool, slots, layout, spec):
    """Prefill the scenario, then greedy-decode; logits of every step (valid rows)."""
    prompts, kv = scenario()
    n = len(prompts)
    samp = [Sampling()] * n
    b = prefill_batch(prompts, kv, REQ_SLOT, samp, slots, EC, layout, device_put=False)
    pool, out = step_prefill(params, pool, b, spec=spec.with_(logits="all"))
    logits = [np.asarray(out.logits)[:sum(map(len, prompts))]]
    tokens, pos = np.asarray(out.tokens)[:n], [len(p) for p in prompts]
    for _ in range(DECODE_STEPS):
        b = decode_batch(list(tokens), pos, kv, REQ_SLOT, samp, slots, EC, layout,
                         device_put=False)
        pool, out = step_decode(params, pool, b, spec=spec.with_(logits="last"))
        logits.append(np.asarray(out.logits)[:n])
        tokens, pos = np.asarray(out.tokens)[:n], [p + 1 for p in pos]
    return logits


@functools.lru_cache(maxsize=None)
def single_device_logits(name):
    mc, params = model(name)
    layout = PoolLayout.create(mc, EC)
    pool, slots = load_all(init_pool(layout, jnp.float32),
                           [a.pack(layout) for a in adapters(mc)], load_adapter_pages)
    return run(prefill, decode, params, pool, slots, layout, StepSpec(mc, layout))


class TPSetup:
    def __init__(self, name, n):
        self.mc, params = model(name)
        self.name, self.n = name, n
        self.mesh = make_tp_mesh(n)
        layout = PoolLayout.create(self.mc, EC)
        self.spec = TPSpec.create(StepSpec(self.mc, layout), self.mesh)
        self.params = shard_params(params, self.mesh)
        self.pool, self.slots = load_all(
            init_tp_pool(layout, self.mesh, jnp.float32),
            [pack_tp_adapter(a, self.spec.layout, n) for a in adapters(self.mc)],
            functools.partial(tp_load_adapter_pages, mesh=self.mesh))
        # Lowering needs only the pool's type; the real one is donated by the steps.
        self.pool_type = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), self.pool)

    def decode_batch(self, with_adapters=True):
        prompts, kv = scenario()
        slot = REQ_SLOT if with_adapters else [-1] * len(REQ_SLOT)
        return decode_batch([1] * len(kv), [len(p) for p in prompts], kv, slot,
                            [Sampling()] * len(kv), self.slots, EC, self.spec.layout,
                            device_put=False)

    def prefill_batch(self):
        prompts, kv = scenario()
        return prefill_batch(prompts, kv, REQ_SLOT, [Sampling()] * len(kv), self.slots, EC,
                             self.spec.layout, device_put=False)

    @functools.cache
    def hlo(self, step, with_adapters=True):
        # The specs of run(), so that the executables compiled there are reused.
        if step == "decode":
            lowered = tp_decode.lower(self.params, self.pool_type, self.decode_batch(with_adapters),
                                      spec=self.spec.with_(logits="last"))
        else:
            lowered = tp_prefill.lower(self.params, self.pool_type, self.prefill_batch(),
                                       spec=self.spec.with_(logits="all"))
        return lowered.compile().as_text()


@pytest.fixture(scope="module", params=CASES)
def tp(request):
    return TPSetup(*request.param)


def rel_err(a, b):
    return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-9))


def test_logits_match_single_device(tp):
    """Prefill (every prompt token) and two greedy decode steps, mixed adapters + base."""
    ref = single_device_logits(tp.name)
    got = run(tp_prefill, tp_decode, tp.params, tp.pool, tp.slots, tp.spec.layout, tp.spec)
    tp.pool = None        # donated by the steps above
    for i, (g, r) in enumerate(zip(got, ref)):
        assert g.shape == r.shape
        assert rel_err(g, r) < 1e-4, f"step {i}: {rel_err(g, r)}"


def _collectives(hlo):
    """[(op, result shape)] of every cross-device transfer in compiled HLO, one per
    operand: XLA:GPU combines independent collectives into one (tuple-typed) op and
    splits them into -start/-done pairs; XLA:CPU does neither."""
    out = []
    for typ, op, start in re.findall(
            r"=\s*(\(.*?\)|\S+)\s+(all-reduce|all-gather|reduce-scatter|all-to-all|"
            r"collective-permute)(-start)?\(", hlo):
        shapes = re.findall(r"[a-z]+[0-9]*\[[0-9,]*\]", typ)
        if op == "all-gather" and start:
            shapes = shapes[len(shapes) // 2:]       # ((operands), (results))
        out += [(op, s) for s in shapes]
    return out


@pytest.mark.parametrize("with_adapters", [True, False], ids=["lora", "base-only"])
def test_collectives_are_s_lora(tp, with_adapters):
    """Decode: per layer 2 all-reduces of [B, H]; LoRA adds only [B, r]-sized ones."""
    b, h, r, n, layers = EC.max_batch, tp.mc.hidden_size, tp.spec.layout.max_rank, tp.n, \
        tp.mc.num_layers
    got = sorted(_collectives(tp.hlo("decode", with_adapters)))
    want = [("all-reduce", f"f32[{b},{h}]")] * (2 * layers)
    if with_adapters:
        want += [("all-reduce", f"f32[{b},{r}]")] * (len(ROW_MODULES) * layers)
        want += [("all-gather", f"f32[{b},{r // n},{n}]")] * (len(COLUMN_MODULES) * layers)
    assert got == sorted(want)


def _alias_params(hlo):
    m = re.search(r"input_output_alias=\{(.*?)\}\s*,\s*entry", hlo, re.S)
    assert m, "compiled module has no input_output_alias: the pool is not donated"
    return {int(p) for p in re.findall(r"\(\s*(\d+)\s*,", m.group(1))}


@pytest.mark.parametrize("step", ["decode", "prefill"])
def test_pool_shards_updated_in_place(tp, step):
    """Every pool shard is aliased input->output and the compiled step copies none."""
    hlo = tp.hlo(step)
    n_params = len(jax.tree.leaves(tp.params))
    assert set(range(n_params, n_params + tp.mc.num_layers)) <= _alias_params(hlo)
    lay = tp.spec.layout
    shape = "f32[%d,%d,%d]" % (lay.num_pages, lay.page_size, lay.row_width)
    assert shape in hlo                      # the per-device shard, not the global pool
    copies = [l for l in hlo.splitlines()
              if re.search(r"=\s*" + re.escape(shape) + r"\{[^}]*\}\s+copy\(", l)]
    assert not copies, copies[:3]


@pytest.mark.parametrize("n", [2, 4])
def test_adapter_shards_reassemble(n):
    """The N shards of each matrix are exactly the adapter (plus zero rank padding)."""
    mc, _ = model("mha")
    ad = adapters(mc)[1]                       # rank 8, all modules
    ad3 = adapters(mc)[4]                      # rank 3: padded for column modules
    for a in (ad, ad3):
        shards = shard_adapter(a, n)
        ranks = tp_ranks(a.ranks, n)
        for m, (a_t, b) in a.weights[0].items():
            parts = [shards[d][0][m] for d in range(n)]
            r, rp = a.ranks[m], ranks[m]
            if m in COLUMN_MODULES:
                assert rp % n == 0 and rp - r < n
                a_full = np.zeros((rp, a_t.shape[1]), a_t.dtype)
                for d, (ad_t, _) in enumerate(parts):      # rank row j on device j % n
                    a_full[d::n] = ad_t
                b_full = np.concatenate([p[1] for p in parts], axis=1)
                np.testing.assert_array_equal(a_full[:r], a_t)
                np.testing.assert_array_equal(b_full[:r], b)
                assert not a_full[r:].any() and not b_full[r:].any()
            else:
                assert rp == r
                np.testing.assert_array_equal(np.concatenate([p[0] for p in parts], 1), a_t)
                np.testing.assert_array_equal(np.concatenate([p[1] for p in parts], 1), b)
