"""The work plan of the LoRA kernels (`lora_mgpu`): XLA on small int arrays, built once
per step and shared by every layer.

*Token plan* (`TokenPlan`, `plan_tokens`): the tokens are cut into aligned tiles of
`block_tokens` (8 at decode) and one *item* is one (token tile, slot) pair for every
slot with tokens in that tile (as ragged_dot maps groups to blocks). Two kinds:

- *grouped*: the caller ordered the tokens by slot (the decode step does, once per
  step, for all layers), so a tile holds few slots and an adapter shared by many
  requests is read by few tiles. An item is one slot's run of tokens in a tile.
- *unsorted*: tiles of the tokens as they come (prefill, where a prompt is already one
  run, and small decode batches). A tile's items are as many as its distinct slots,
  and each item's tokens are those of its tile with its slot.

Rows move by TMA in *groups* of 8 rank rows, read in the view of the pool in which the
matrix's rank rows are rows (`pallas_kernels.geometry.matrix_form`: `[*, W]` for a flat
matrix whose width W divides H, `[*, C]` for a chunked one, C = gcd(W, H), where each
column chunk is its own run of rank rows). `KVLayout.adapter_offsets` starts every
matrix 8-aligned in that view, so a slot of rank r owns exactly ceil(r/8) groups per
module and chunk. This needs `page_size * H / C % 8 == 0`, so that a group never
straddles a page.

*Packing* (`GroupPlan`): the groups of all items of a token tile are laid end to end and
cut into *chunks* of 8 groups, the 64 rows of one wgmma operand, so a rank-16 slot fills
a quarter of a chunk instead of padding its rows to 64. The shrink packs the groups of
all modules that read the same x together; the expand packs each module on its own, and
its `xs` (the block-diagonal scale·xa each chunk multiplies) is gathered from the
shrink's chunks (`xs_from_shrink`) or from a given xa (`xs_from_xa`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from pallas_kernels.geometry import matrix_form

GROUP = 8               # rank rows per TMA copy: one 8-row tile of a wgmma operand
CHUNK = 8               # groups per chunk: the 64 rows of one wgmma operand
ROWS = GROUP * CHUNK


# --- the token plan ------------------------------------------------------------------

@struct.dataclass
class TokenPlan:
    """The (token tile, slot) work items of a step. W = `num_items_bound` items, in tile
    order; an unused item has hi == lo. The plan position of a token is its index."""
    key: jax.Array          # [T] int32 each token's slot, num_slots for none
    item_slot: jax.Array    # [W] int32
    item_tile: jax.Array    # [W] int32
    item_lo: jax.Array      # [W] int32 first token of the item
    item_hi: jax.Array      # [W] int32 past its last token
    pos_item: jax.Array     # [T] int32 the item owning each token
    num_slots: int = struct.field(pytree_node=False)
    block_tokens: int = struct.field(pytree_node=False)
    grouped: bool = struct.field(pytree_node=False)   # items are slot runs (module doc)

    @property
    def num_tokens(self) -> int:
        return self.key.shape[0]

    @property
    def num_tiles(self) -> int:
        return -(-self.num_tokens // self.block_tokens)


def pick_block_tokens(num_tokens: int, num_slots: int, max_tokens: int) -> int:
    """Tokens per tile: 8 at decode (one token per request), up to `max_tokens` when
    slots hold many tokens (prefill)."""
    per_slot = max(1, num_tokens // max(num_slots, 1))
    return int(min(max_tokens, max(8, 1 << (per_slot - 1).bit_length())))


def num_items_bound(num_tokens: int, num_slots: int, block_tokens: int,
                    grouped: bool) -> int:
    """Static bound on work items. Grouped: each tile, plus one per slot that starts
    mid-tile. Unsorted: each tile's distinct slots (at most its tokens)."""
    nt = -(-num_tokens // block_tokens)
    if grouped:
        return nt + min(num_slots + 1, num_tokens)
    return min(num_tokens, nt * min(block_tokens, num_slots + 1))


def plan_tokens(token_slot: jax.Array, num_slots: int, block_tokens: int, *,
                grouped: bool) -> TokenPlan:
    """The work items of tokens `token_slot` [T] int32 (-1 = no adapter: those tokens
    form one more pseudo-slot `num_slots`, whose items write zero rows in the expand).
    `grouped`: the caller ordered the tokens by slot (keys non-decreasing, no-adapter
    tokens last: `slot_order`)."""
    t = token_slot.shape[0]
    key = jnp.where(token_slot >= 0, token_slot, num_slots).astype(jnp.int32)
    if not grouped:
        return _plan_unsorted(key, num_slots, block_tokens)
    nseg = num_slots + 1
    bt = block_tokens
    counts = (key[:, None] == jnp.arange(nseg, dtype=jnp.int32)[None, :]).sum(0,
                                                                             dtype=jnp.int32)
    ends = jnp.cumsum(counts, dtype=jnp.int32)
    starts = ends - counts
    first_tile = starts // bt
    n_items = jnp.where(counts > 0, (ends - 1) // bt - first_tile + 1, 0)
    item_end = jnp.cumsum(n_items, dtype=jnp.int32)
    item_base = item_end - n_items
    w = jnp.arange(num_items_bound(t, num_slots, bt, True), dtype=jnp.int32)
    slot = jnp.minimum(jnp.searchsorted(item_end, w, side="right", method="compare_all"),
                       nseg - 1).astype(jnp.int32)
    tile = first_tile[slot] + (w - item_base[slot])
    used = w < item_end[-1]
    lo = jnp.where(used, jnp.maximum(starts[slot], tile * bt), 0)
    hi = jnp.where(used, jnp.minimum(ends[slot], (tile + 1) * bt), 0)
    p = jnp.arange(t, dtype=jnp.int32)
    pos_item = item_base[key] + p // bt - first_tile[key]
    return TokenPlan(key=key, item_slot=slot, item_tile=jnp.where(used, tile, 0), item_lo=lo,
                     item_hi=hi, pos_item=pos_item, num_slots=num_slots, block_tokens=bt,
                     grouped=True)


def _plan_unsorted(key: jax.Array, num_slots: int, bt: int) -> TokenPlan:
    """The items of unsorted tokens: the distinct (tile, key) pairs."""
    t = key.shape[0]
    nseg = num_slots + 1
    p = jnp.arange(t, dtype=jnp.int32)
    pair = (p // bt) * nseg + key                       # tile-major, so items in tile order
    perm = jnp.argsort(pair).astype(jnp.int32)
    spair = pair[perm]
    first = jnp.concatenate([jnp.ones((1,), bool), spair[1:] != spair[:-1]])
    item = jnp.cumsum(first, dtype=jnp.int32) - 1       # item of each entry of spair
    bound = num_items_bound(t, num_slots, bt, False)
    item_pair = jnp.full((bound,), -1, jnp.int32).at[jnp.where(first, item, bound)].set(
        spair, mode="drop")
    used = item_pair >= 0
    tile = jnp.where(used, item_pair // nseg, 0)
    slot = jnp.where(used, item_pair % nseg, nseg - 1)
    lo = jnp.where(used, tile * bt, 0)
    hi = jnp.where(used, jnp.minimum(tile * bt + bt, t), 0)
    pos_item = jnp.zeros((t,), jnp.int32).at[perm].set(item)
    return TokenPlan(key=key, item_slot=slot, item_tile=tile, item_lo=lo, item_hi=hi,
                     pos_item=pos_item, num_slots=num_slots, block_tokens=bt, grouped=False)


def slot_order(token_slot: jax.Array, num_slots: int) -> tuple[jax.Array, jax.Array]:
    """(order, where) of the tokens sorted by slot, stable, no-adapter tokens (-1)
    last: order [T] is the token at each sorted position, where [T] its inverse. What a
    caller applies to its rows to hand `plan_tokens` grouped tokens."""
    t = token_slot.shape[0]
    key = jnp.where(token_slot >= 0, token_slot, num_slots)
    order = jnp.argsort(key, stable=True).astype(jnp.int32)
    where = jnp.zeros((t,), jnp.int32).at[order].set(jnp.arange(t, dtype=jnp.int32))
    return order, where


# --- packing (once per step and module group) ------------------------------------------

def _group_rows(slot_pages, offset, rank, item_slot, *, num_groups, chunks, per, page_size,
                num_rows):
    """Row (in the width-C view) of each work item's 8-row groups, per column chunk:
    [W, chunks, num_groups]; past the slot's rank, `num_rows` (a row past the pool).
    `per`: view rows per pool row (H // C)."""
    s_max = slot_pages.shape[0]
    slot = jnp.minimum(item_slot, s_max - 1)
    off = offset[slot] * per                              # view rows, 8-aligned
    r = jnp.where(item_slot < s_max, rank[slot], 0)
    need = (r + GROUP - 1) // GROUP
    stride = need * GROUP if chunks > 1 else jnp.zeros_like(need)   # rank rows per chunk
    g = jnp.arange(num_groups, dtype=jnp.int32)
    c = jnp.arange(chunks, dtype=jnp.int32)
    srow = off[:, None, None] + c[None, :, None] * stride[:, None, None] + g[None, None, :] * GROUP
    ps = page_size * per
    pidx = jnp.minimum(srow // ps, slot_pages.shape[1] - 1)
    page = jnp.take_along_axis(slot_pages[slot], pidx.reshape(pidx.shape[0], -1),
                               axis=1).reshape(srow.shape)
    live = g[None, None, :] < need[:, None, None]
    return jnp.where(live, page * ps + srow % ps, num_rows).astype(jnp.int32)


def _pack(tp: TokenPlan, ranks: jax.Array):
    """Lay each tile's groups end to end: item w's module-m groups are the packed
    groups pos[w, m] .. pos[w, m] + groups[w, m] - 1, and tile t owns chunks
    starts[t] .. starts[t + 1] - 1. ranks: [S, M]. Items come in tile order."""
    s = ranks.shape[0]
    slot = tp.item_slot
    valid = (tp.item_hi > tp.item_lo) & (slot < s)
    r = jnp.where(valid[:, None], ranks[jnp.minimum(slot, s - 1)], 0)
    groups = ((r + GROUP - 1) // GROUP).astype(jnp.int32)                    # [W, M]
    per_item = groups.sum(1)
    tile = tp.item_tile
    per_tile = jnp.zeros((tp.num_tiles,), jnp.int32).at[tile].add(per_item)
    starts = jnp.concatenate([jnp.zeros((1,), jnp.int32),
                              jnp.cumsum((per_tile + CHUNK - 1) // CHUNK, dtype=jnp.int32)])
    before_item = jnp.cumsum(per_item, dtype=jnp.int32) - per_item
    before_tile = jnp.cumsum(per_tile, dtype=jnp.int32) - per_tile
    first = starts[tile] * CHUNK + before_item - before_tile[tile]
    pos = first[:, None] + jnp.cumsum(groups, axis=1, dtype=jnp.int32) - groups
    return starts, pos, groups


def _expand_guard(tp: TokenPlan, ranks: jax.Array) -> jax.Array:
    """[M, NT] int32: 1 where a tile's B chunks hold rows that some token of the tile
    multiplies by a 0 of its xs: the tile holds tokens of several keys (slots, or no
    adapter), or a slot's last group runs past its rank (rows the pack fills with
    zeros, but they are not the slot's, and a stale one must still add nothing). The
    expand makes those tiles' B finite before the product, since 0 * NaN is NaN."""
    s = ranks.shape[0]
    slot, tile = tp.item_slot, tp.item_tile
    used = tp.item_hi > tp.item_lo
    keys = jnp.zeros((tp.num_tiles,), jnp.int32).at[tile].add(used.astype(jnp.int32))
    r = jnp.where((used & (slot < s))[:, None], ranks[jnp.minimum(slot, s - 1)], 0)
    partial = jnp.zeros((tp.num_tiles, ranks.shape[1]), jnp.int32).at[tile].max(
        (r % GROUP != 0).astype(jnp.int32))
    return ((keys[:, None] > 1) | (partial > 0)).T.astype(jnp.int32)


def width_groups(widths) -> dict:
    """{width: the modules of that width}, in order of first appearance: the modules one
    expand launch serves."""
    return {w: [j for j, v in enumerate(widths) if v == w] for w in dict.fromkeys(widths)}


def _chunks_bound(num_items: int, num_mod: int, max_groups: int, num_tiles: int) -> int:
    """Static bound on the chunks of a packing: sum over tiles of ceil(groups / 8)."""
    return (num_items * num_mod * max_groups + (CHUNK - 1) * num_tiles) // CHUNK + 1


def _packed_rows(slot_pages, offsets, ranks, tp, pos, groups, *, bound, chunks, per,
                 page_size, num_rows, max_groups):
    """Pool row (width-C view) of every packed group, per column chunk:
    [bound * 8, chunks]; `num_rows` (past the pool) where no group is packed."""
    rows = jnp.stack([_group_rows(slot_pages, offsets[:, j], ranks[:, j], tp.item_slot,
                                  num_groups=max_groups, chunks=chunks, per=per,
                                  page_size=page_size, num_rows=num_rows)
                      for j in range(offsets.shape[1])], axis=1)     # [W, M, chunks, G]
    g = jnp.arange(max_groups, dtype=jnp.int32)
    idx = jnp.where(g < groups[:, :, None], pos[:, :, None] + g, bound * CHUNK)
    out = jnp.full((bound * CHUNK, chunks), num_rows, jnp.int32)
    return out.at[idx.reshape(-1)].set(rows.transpose(0, 1, 3, 2).reshape(-1, chunks),
                                       mode="drop")


def _static(**kw):
    return struct.field(pytree_node=False, **kw)


@struct.dataclass
class GroupPlan:
    """Everything the kernels of one module group need that does not depend on the
    layer: built once per step (`group_plan`) and used by every layer."""
    tokens: TokenPlan
    ranks: jax.Array                 # [S, M]
    scales: jax.Array                # [S, M]
    s_starts: jax.Array | None       # [NT + 1] first chunk of each tile
    s_pos: jax.Array | None          # [W, M] packed group of each item's module group 0
    s_rows: jax.Array | None         # [s_bound * 8, chunks_a] pool row of each packed group
    s_tile: jax.Array | None         # [s_bound] tile of each chunk (0 past the last)
    e_starts: jax.Array | None       # [M, NT + 1]
    e_guard: jax.Array | None        # [M, NT] 1: the tile's B is made finite (`_expand_guard`)
    e_rows: tuple                    # per distinct width: [its M, e_bound * 8, chunks_b]
    e_item: jax.Array | None         # [M, e_bound * 8] item of each packed group (-1: none)
    e_group: jax.Array | None        # [M, e_bound * 8] its group within the item's module
    # Per distinct width (shrink and expand parts only): the tables `xs_from_shrink`
    # reads, so a layer's xs is one gather and no index arithmetic (`_xs_tables`).
    xs_tabs: tuple                   # [6, its M, e_bound * 8] int32
    xs_scale: tuple                  # [its M, e_bound * 8] float32
    max_rank: int = _static()
    k_in: int | None = _static()     # shrink input width (None: no shrink part)
    widths: tuple = _static()        # output width of each module (): no expand part
    s_bound: int = _static()         # shrink chunks, static bound
    e_bound: int = _static()         # expand chunks per module, static bound


def group_plan(tp: TokenPlan, slot_pages, a_offsets, b_offsets, ranks, scales, *, k_in,
               widths, h, page_size, max_rank, num_rows) -> GroupPlan:
    """The packing of one module group (see the module docstring). a_offsets,
    b_offsets, ranks, scales: [S, M]; widths: M output widths (() : no expand part);
    k_in None: no shrink part; h: pool row width; num_rows: pool rows."""
    n_mod = ranks.shape[1]
    nt = tp.num_tiles
    w_max = tp.item_tile.shape[0]
    gmax = -(-max_rank // GROUP)
    s_bound, s_starts, s_pos, s_rows, s_tile = 0, None, None, None, None
    if k_in is not None:
        ca, chunks_a = matrix_form(k_in, h)
        s_bound = _chunks_bound(w_max, n_mod, gmax, nt)
        s_starts, s_pos, s_groups = _pack(tp, ranks)
        s_rows = _packed_rows(slot_pages, a_offsets, ranks, tp, s_pos, s_groups,
                              bound=s_bound, chunks=chunks_a, per=h // ca, page_size=page_size,
                              num_rows=num_rows * (h // ca), max_groups=gmax)
        s_tile = jnp.clip(jnp.searchsorted(s_starts, jnp.arange(s_bound, dtype=jnp.int32),
                                           side="right", method="compare_all") - 1,
                          0, nt - 1).astype(jnp.int32)
    e_bound = _chunks_bound(w_max, 1, gmax, nt)
    e_starts, e_rows, e_item, e_group = [], [], [], []
    g = jnp.arange(gmax, dtype=jnp.int32)
    w_ids = jnp.broadcast_to(jnp.arange(w_max, dtype=jnp.int32)[:, None], (w_max, gmax))
    for j, width in enumerate(widths):
        cb, chunks_b = matrix_form(width, h)
        st, pos, grp = _pack(tp, ranks[:, j:j + 1])
        e_starts.append(st)
        e_rows.append(_packed_rows(slot_pages, b_offsets[:, j:j + 1], ranks[:, j:j + 1], tp,
                                   pos, grp, bound=e_bound, chunks=chunks_b, per=h // cb,
                                   page_size=page_size, num_rows=num_rows * (h // cb),
                                   max_groups=gmax))
        idx = jnp.where(g < grp, pos + g, e_bound * CHUNK).reshape(-1)
        e_item.append(jnp.full((e_bound * CHUNK,), -1, jnp.int32).at[idx].set(
            w_ids.reshape(-1), mode="drop"))
        e_group.append(jnp.full((e_bound * CHUNK,), -1, jnp.int32).at[idx].set(
            jnp.broadcast_to(g, (w_max, gmax)).reshape(-1), mode="drop"))
    gp = GroupPlan(tokens=tp, ranks=ranks, scales=scales, s_starts=s_starts, s_pos=s_pos,
                   s_rows=s_rows, s_tile=s_tile,
                   e_starts=jnp.stack(e_starts) if widths else None,
                   e_guard=_expand_guard(tp, ranks) if widths else None,
                   e_rows=tuple(jnp.stack([e_rows[j] for j in mods])
                                for mods in width_groups(widths).values()),
                   e_item=jnp.stack(e_item) if widths else None,
                   e_group=jnp.stack(e_group) if widths else None,
                   xs_tabs=(), xs_scale=(), max_rank=max_rank, k_in=k_in,
                   widths=tuple(widths), s_bound=s_bound, e_bound=e_bound)
    if k_in is None or not widths:
        return gp
    tabs = [_xs_tables(gp, mods) for mods in width_groups(widths).values()]
    return gp.replace(xs_tabs=tuple(i for i, _ in tabs), xs_scale=tuple(f for _, f in tabs))


# --- the expand's xs (per layer) -------------------------------------------------------

def _xs_index(gp: GroupPlan, mods: list[int]):
    """Index arrays over the expand's xs [Mg, e_bound, bt, 8 groups, 8 rank rows]: each
    element's item, group within the item's module, token column and rank row, its scale,
    and whether it is live (a packed group, below its slot's rank, and one of the item's
    own tokens: zeros elsewhere make the product block-diagonal). Shaped so that the
    gathers below write xs in the kernel's layout, with no transpose after them."""
    tp = gp.tokens
    s, bt = tp.num_slots, tp.block_tokens
    mg = len(mods)
    m = jnp.asarray(mods).reshape(mg, 1, 1, 1, 1)
    item = gp.e_item[jnp.asarray(mods)].reshape(mg, gp.e_bound, 1, CHUNK, 1)
    grp = gp.e_group[jnp.asarray(mods)].reshape(mg, gp.e_bound, 1, CHUNK, 1)
    col = jnp.arange(bt, dtype=jnp.int32).reshape(1, 1, bt, 1, 1)
    rr = jnp.arange(GROUP, dtype=jnp.int32).reshape(1, 1, 1, 1, GROUP)
    w = jnp.maximum(item, 0)
    slot = jnp.minimum(tp.item_slot[w], s - 1)
    tok = tp.item_tile[w] * bt + col                                       # plan position
    live = ((grp >= 0) & (grp * GROUP + rr < gp.ranks[slot, m])
            & (tok >= tp.item_lo[w]) & (tok < tp.item_hi[w]))
    if not tp.grouped:    # an unsorted tile mixes slots: keep the item's own tokens
        live &= tp.key[jnp.minimum(tok, tp.num_tokens - 1)] == tp.item_slot[w]
    return dict(m=m, w=w, grp=jnp.maximum(grp, 0), col=col, rr=rr, tok=tok, live=live,
                scale=gp.scales[slot, m])


def _xs_tables(gp: GroupPlan, mods: list[int]):
    """What `xs_from_shrink` needs of each packed expand group of `mods`, gathered
    from the plan once per step instead of once per layer: [6, Mg, e_bound * 8] int32
    (the packed shrink group it reads; the plan position of its tile's first token;
    its item's first and past-last plan position; its live rank rows, 0..8, 0 where
    no item is packed; its item's slot, which an unsorted tile compares with its
    tokens' keys) and its scale [Mg, e_bound * 8] float32 (0 where no item)."""
    tp = gp.tokens
    m = jnp.asarray(mods)[:, None]
    item, grp = gp.e_item[jnp.asarray(mods)], gp.e_group[jnp.asarray(mods)]
    w = jnp.maximum(item, 0)
    slot = jnp.minimum(tp.item_slot[w], tp.num_slots - 1)
    dead = (item < 0) | (grp < 0)
    g = jnp.maximum(grp, 0)
    nr = jnp.where(dead, 0, jnp.clip(gp.ranks[slot, m] - g * GROUP, 0, GROUP))
    ints = jnp.stack([gp.s_pos[w, m] + g, tp.item_tile[w] * tp.block_tokens,
                      jnp.where(dead, 0, tp.item_lo[w]),
                      jnp.where(dead, 0, tp.item_hi[w]), nr,
                      tp.item_slot[w]]).astype(jnp.int32)
    return ints, jnp.where(dead, 0.0, gp.scales[slot, m]).astype(jnp.float32)


def xs_from_shrink(gp: GroupPlan, out_s, mods: list[int], dtype):
    """The expand's xs [Mg, e_bound, bt, 64] for modules `mods` (one width group) straight
    from the shrink kernel's chunks (sum of the K splits): one gather through the plan's
    tables of this width group (`_xs_tables`)."""
    tp = gp.tokens
    mg, bt = len(mods), tp.block_tokens
    og = out_s.reshape(out_s.shape[0], gp.s_bound * CHUNK, GROUP, bt)
    k = list(width_groups(gp.widths).values()).index(list(mods))
    src, base, lo, hi, nr, slot = (
        a.reshape(mg, gp.e_bound, 1, CHUNK, 1) for a in gp.xs_tabs[k])
    scale = gp.xs_scale[k].reshape(mg, gp.e_bound, 1, CHUNK, 1)
    col = jnp.arange(bt, dtype=jnp.int32).reshape(1, 1, bt, 1, 1)
    rr = jnp.arange(GROUP, dtype=jnp.int32).reshape(1, 1, 1, 1, GROUP)
    tok = base + col
    live = (rr < nr) & (tok >= lo) & (tok < hi)
    if not tp.grouped:    # an unsorted tile mixes slots: keep the item's own tokens
        live &= tp.key[jnp.minimum(tok, tp.num_tokens - 1)] == slot
    xs = jnp.where(live, split_sum(og, src, rr, col) * scale, 0.0).astype(dtype)
    return xs.reshape(mg, gp.e_bound, bt, ROWS)


def split_sum(og, src, rr, col):
    """og[:, src, rr, col].sum(0), gathered through one flat index into each split's
    [chunk groups * 8 * bt] rows (one int32 per element, shared by the splits: a
    4-component index makes XLA materialise one index array per split). A sum of one
    gather per split, so that XLA fuses the gathers, the sum and what follows into one
    loop kernel, where a reduce over the split axis is a kernel of its own
    (benchmarks/PERF.md)."""
    flat = og.reshape(og.shape[0], -1)
    idx = (src * og.shape[2] + rr) * og.shape[3] + col
    total = flat[0][idx]
    for i in range(1, og.shape[0]):
        total = total + flat[i][idx]
    return total


def xs_from_xa(gp: GroupPlan, xa, mods: list[int], dtype):
    """The expand's xs from xa [Mg, T, R] (module j of xa is module mods[j])."""
    tp = gp.tokens
    ix = _xs_index(gp, mods)
    order = jnp.pad(jnp.arange(tp.num_tokens, dtype=jnp.int32),
                    (0, tp.num_tiles * tp.block_tokens - tp.num_tokens))
    j = jnp.arange(len(mods)).reshape(-1, 1, 1, 1, 1)
    i = jnp.minimum(ix["grp"] * GROUP + ix["rr"], xa.shape[2] - 1)
    xs = jnp.where(ix["live"], xa[j, order[ix["tok"]], i] * ix["scale"], 0.0).astype(dtype)
    return xs.reshape(xs.shape[0], gp.e_bound, tp.block_tokens, ROWS)
