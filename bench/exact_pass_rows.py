"""How often the Triton lse forward's exact pass runs: the rows it recomputes, and the
128-row blocks those fall in, for random embeddings over (D, T, classes).

The main pass takes the positives' sum from the exponentials under the shared row shift;
a row that has a positive goes to the exact pass when that sum ends below 2^-64 (fp32),
that is when its positives sit more than 64 bits below its nearest reference. This
script evaluates that criterion in fp64 with the shift at the row max (the kernel's
shift lies within log2(BLOCK_N) + 1 bits above it), on the batch loss (references =
queries, self pair excluded), for N(0, 1) embeddings and for the same embeddings
L2-normalised. "rows" counts the rows the exact pass recomputes; "blocks before" the
128-row blocks it visited when it ran on the main pass's blocks and rows without any
positive were flagged too; "blocks now" those it visits now (the flagged rows first:
ceil(rows / 128)).

    python bench/exact_pass_rows.py      # seconds on 2 CPU cores
    # -> bench/results/exact_pass_rows.json
"""
import json
import math
import os

import torch

from _harness import env_info

N, BLOCK = 4096, 128
POINTS = [(32, 1.0, 10), (32, 0.1, 10), (128, 0.1, 100), (128, 0.05, 100), (128, 0.01, 100),
          (128, 0.1, 1000)]
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "exact_pass_rows.json")


def point(d, t, classes, unit, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, d, generator=g, dtype=torch.float64)
    if unit:
        x = torch.nn.functional.normalize(x, dim=1)
    y = torch.randint(0, classes, (N,), generator=g)
    s = -torch.cdist(x, x).pow(2) / t
    s.fill_diagonal_(-math.inf)
    pos = y[:, None] == y[None, :]
    pos.fill_diagonal_(False)
    has = pos.any(1)
    gap_bits = (s.max(1).values - torch.logsumexp(s.masked_fill(~pos, -math.inf), 1)) / math.log(2)
    under = has & (gap_bits > 64)
    before = (under | ~has).view(-1, BLOCK).any(1)
    return {"embeddings": "unit" if unit else "N(0, 1)", "D": d, "T": t, "classes": classes,
            "N": N, "rows_without_positive": float((~has).double().mean()),
            "rows": float(under.double().mean()),
            "blocks_before": float(before.double().mean()),
            "blocks_now": math.ceil(int(under.sum()) / BLOCK) / (N // BLOCK)}


def main():
    env = env_info("cpu")   # before the results file is rewritten (git status)
    rows = [point(d, t, c, unit) for unit in (False, True) for d, t, c in POINTS]
    with open(OUT, "w") as f:
        json.dump({"env": env, "block_m": BLOCK, "points": rows}, f, indent=1)
    for r in rows:
        print(f"{r['embeddings']:8s} D={r['D']:3d} T={r['T']:<5} C={r['classes']:<5} "
              f"rows {r['rows']:6.1%}  blocks before {r['blocks_before']:5.0%}  "
              f"now {r['blocks_now']:5.0%}")


if __name__ == "__main__":
    main()
