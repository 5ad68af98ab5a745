"""Plots of a saturation sweep (`serve_load.py --sweep`, `make bench-saturation`).

Reads `results/saturation_<device>_<commit>.json` and draws, per model, ranks and adapter
count: the served rate against the offered one, the first-token SLO attainment, the
first-token latency (p50 and p99), and the rate each adapter count sustains within the SLO
against the number of adapters (S-LoRA's headline figure). Writes a PNG beside the JSON
(or to `--out`) and prints the sustained rates as a table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict

SLO_FLOOR = 0.9          # the sweep's bar: a rate counts as sustained at >= 90% attainment


def load(path: str) -> dict:
    with open(path) as f:
        rec = json.load(f)
    rows = rec.get("rows")
    if not rows:
        raise ValueError(f"{path}: no sweep rows (is it a saturation_*.json?)")
    need = {"model", "adapters", "ranks", "offered_req_s", "served_req_s", "slo_attainment",
            "ttft_p50_s", "ttft_p99_s"}
    for i, r in enumerate(rows):
        if need - r.keys():
            raise ValueError(f"{path}: row {i} lacks {sorted(need - r.keys())}")
    return rec


def series(rows: list[dict]) -> dict[tuple, list[dict]]:
    """Rows by (model, ranks, adapters), each list in order of offered rate."""
    out: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        out[(r["model"], r["ranks"], r["adapters"])].append(r)
    return {k: sorted(v, key=lambda r: r["offered_req_s"]) for k, v in sorted(out.items())}


def sustained(rows: list[dict]) -> dict[tuple, float | None]:
    """The highest served rate within the SLO per (model, ranks, adapters); None where no
    point of the series met it."""
    return {k: max((r["served_req_s"] for r in v if r["slo_attainment"] >= SLO_FLOOR),
                   default=None) for k, v in series(rows).items()}


def _label(key: tuple) -> str:
    model, ranks, n = key
    return f"{model}, base only" if n == 0 else f"{model}, {n} adapters, rank {ranks}"


MARKERS = "o^vDsP*X"


def styles(keys: list[tuple]) -> dict[tuple, tuple[tuple, str]]:
    """A colour and a marker per series, none shared by two: a marker per model, and the
    20 colours of tab20, the dark shade of each hue first."""
    from matplotlib import colormaps
    cmap = colormaps["tab20"]
    order = list(range(0, 20, 2)) + list(range(1, 20, 2))
    models = sorted({k[0] for k in keys})
    return {k: (cmap(order[i % 20]), MARKERS[(models.index(k[0]) + i // 20) % len(MARKERS)])
            for i, k in enumerate(keys)}


def plot(rec: dict, out: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = series(rec["rows"])
    fig, ax = plt.subplots(2, 2, figsize=(12, 9))
    (served, slo), (ttft, scale) = ax
    top = max(r["offered_req_s"] for r in rec["rows"])
    served.plot([0, top], [0, top], color="0.8", lw=1, label="served = offered")
    slo.axhline(100 * SLO_FLOOR, color="0.6", ls=":", lw=1)
    style = styles(list(groups))
    for key, rows in groups.items():
        x = [r["offered_req_s"] for r in rows]
        c, m = style[key]
        served.plot(x, [r["served_req_s"] for r in rows], "-", marker=m, color=c,
                    label=_label(key))
        slo.plot(x, [100 * r["slo_attainment"] for r in rows], "-", marker=m, color=c)
        ttft.plot(x, [r["ttft_p50_s"] for r in rows], "-", marker=m, color=c)
        ttft.plot(x, [r["ttft_p99_s"] for r in rows], "--", marker=m, color=c, alpha=.5,
                  mfc="none")
    by_model: dict[tuple, list[tuple[int, float]]] = defaultdict(list)
    for (model, ranks, n), best in sustained(rec["rows"]).items():
        if best is None:
            continue
        if n == 0:
            scale.axhline(best, ls="--", lw=1, color="0.4")
            scale.text(0.01, best, f" {model} base only", fontsize=8, color="0.3",
                       va="bottom", transform=scale.get_yaxis_transform())
        else:
            by_model[(model, ranks)].append((n, best))
    lines = styles(sorted(by_model))
    for (model, ranks), pts in sorted(by_model.items()):
        pts.sort()
        c, m = lines[(model, ranks)]
        scale.plot([n for n, _ in pts], [b for _, b in pts], "-", marker=m, color=c,
                   label=f"{model}, rank {ranks}")
    served.set(xlabel="offered req/s", ylabel="served req/s", title="throughput")
    slo.set(xlabel="offered req/s", ylabel="% within first-token SLO", ylim=(0, 105),
            title="SLO attainment")
    ttft.set(xlabel="offered req/s", ylabel="first token s (p50 solid, p99 dashed)",
             yscale="log", title="first-token latency")
    best = [b for b in sustained(rec["rows"]).values() if b is not None]
    scale.set(xscale="log", xlabel="adapters", ylabel=f"req/s served at >= "
              f"{100 * SLO_FLOOR:.0f}% SLO", ylim=(0, 1.15 * max(best, default=1)),
              title="sustained rate")
    served.legend(fontsize=8)
    if by_model:
        scale.legend(fontsize=8)
    for a in ax.flat:
        a.grid(alpha=.3)
    fig.suptitle(f"saturation, {rec.get('device', '?')}, commit {rec.get('commit', '?')}, "
                 f"{rec.get('date', '')}")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("json", help="a saturation_<device>_<commit>.json")
    ap.add_argument("--out", help="PNG path (default: the JSON's, .png)")
    args = ap.parse_args(argv)
    try:
        rec = load(args.json)
    except (OSError, ValueError) as e:
        print(f"plot_saturation: {e}", file=sys.stderr)
        return 2
    out = args.out or os.path.splitext(args.json)[0] + ".png"
    plot(rec, out)
    print("| model | ranks | adapters | sustained req/s |\n|---|---|---|---|")
    for (model, ranks, n), best in sustained(rec["rows"]).items():
        print(f"| {model} | {ranks} | {n} | {'-' if best is None else f'{best:.2f}'} |")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
