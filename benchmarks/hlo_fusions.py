"""Print the HLO of named XLA kernels from an XLA dump: what a fusion in a CUPTI
breakdown (`e2e_decode.py --breakdown`) computes and which operands it reads.

    XLA_FLAGS="--xla_dump_to=/tmp/dump --xla_dump_hlo_as_text --xla_dump_hlo_pass_re=NONE" \\
        python benchmarks/e2e_decode.py --preset llama-7b --batches 32:512 --adapters 1 \\
        --iters 2 --lora-backend pallas --attention-backend pallas --breakdown 12
    python benchmarks/hlo_fusions.py /tmp/dump loop_convert_fusion_157

A CUPTI kernel name `loop_convert_fusion_157` is the HLO instruction
`loop_convert_fusion.157`. The largest after-optimizations modules are searched
(`--modules`, default the 3 largest: the steps); each match prints the fusion's line
and the body of the computation it calls, cut at `--chars`.
"""

from __future__ import annotations

import argparse
import glob
import os
import re


def computations(text: str) -> dict[str, str]:
    """name -> body of every computation in an HLO module's text."""
    return {m.group(1).lstrip("%"): m.group(2)
            for m in re.finditer(r"^(%?[\w.\-]+) [^\n]*\{\n(.*?)^\}", text, re.S | re.M)}


def find(text: str, kernel: str, chars: int) -> list[str]:
    """The HLO line of each instruction named like `kernel` (`_` or `.` before the
    number), each followed by the body of the computation it calls."""
    comps = computations(text)
    name = re.escape(kernel).replace("_", "[_.]")
    pat = re.compile(r"^\s*(?:ROOT\s+)?%?(" + name + r") = .*$", re.M)
    out = []
    for m in pat.finditer(text):
        line = m.group(0).strip()
        out.append("-- " + line[:chars])
        called = re.search(r"calls=%?([\w.\-]+)", line)
        if called and called.group(1) in comps:
            out.append(comps[called.group(1)][:chars])
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dump", help="the --xla_dump_to directory")
    ap.add_argument("kernels", nargs="+", help="kernel names as CUPTI reports them")
    ap.add_argument("--modules", type=int, default=3, help="largest modules to search")
    ap.add_argument("--chars", type=int, default=6000, help="cut each print at this")
    args = ap.parse_args(argv)
    files = sorted(glob.glob(os.path.join(args.dump, "*after_optimizations.txt")),
                   key=os.path.getsize)[-args.modules:]
    if not files:
        raise SystemExit(f"{args.dump}: no *after_optimizations.txt (dump with "
                         "--xla_dump_hlo_as_text)")
    for f in files:
        text = open(f).read()
        print(f"===== {os.path.basename(f)} ({len(text)} chars)")
        for k in args.kernels:
            print("\n".join(find(text, k, args.chars)) or f"   {k}: not in this module")


if __name__ == "__main__":
    main()
