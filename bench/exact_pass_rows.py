"""How much the Triton lse forward's exact passes recompute: the rows whose positives
underflow, and the share of all (row, reference) tiles the pass that redoes them visits,
for random embeddings over (D, T, classes) and at the speed check's target shape.

The main pass takes the positives' sum from the exponentials under the shared row shift;
a row that has a positive is flagged (2) when that sum ends below 2^-64 (fp32), that is
when its positives sit more than 64 bits below its nearest reference. This script
evaluates that criterion with the shift at the row max (the kernel's shift lies within
log2(BLOCK_N) + 1 bits above it), on the batch loss (references = queries, self pair
excluded), for N(0, 1) embeddings and for the same embeddings L2-normalised (fp64,
N = 4096), and for ``bench/gpu_perf.py``'s inputs at N = 65536, D = 128, 1000 classes,
T = 0.1 (N(0, 0.3^2) rows rounded to bf16, and the same rows L2-normalised; fp32 in
row chunks).

"rows": the flagged rows. "blocks before": the 128-row blocks the exact pass visited
when it ran on the main pass's blocks and rows without any positive were flagged too;
"tiles, both sums": the share of the N x M tiles a pass that redoes both sums of the
flagged rows over every reference visits (ceil(rows / 128) blocks: the exact pass before
it had positives-only blocks); "tiles, positives pass": the share its positives-only
blocks visit now (the flagged rows grouped by label in blocks of 128, each block over the
references of its labels, a contiguous range of label order, in tiles of 128).

    python bench/exact_pass_rows.py      # about 3 minutes on 2 CPU cores (the target rows)
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
TARGET = dict(n=65536, d=128, classes=1000, t=0.1, chunk=2048)
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "exact_pass_rows.json")


def _flags(x, y, t, chunk, rows=None):
    """(flagged rows, rows with a positive) of the batch x (labels y) at temperature t,
    the logits computed ``chunk`` rows at a time; ``rows``: only the first that many
    (a sample; the others False)."""
    n = x.shape[0]
    sq = x.pow(2).sum(1)
    under = torch.zeros(n, dtype=torch.bool)
    has = torch.zeros(n, dtype=torch.bool)
    for i in range(0, n if rows is None else rows, chunk):
        rows = torch.arange(i, min(i + chunk, n))
        s = (2 * x[rows] @ x.T - sq[None, :] - sq[rows, None]) / t
        s[torch.arange(len(rows)), rows] = -math.inf
        pos = y[rows, None] == y[None, :]
        pos[torch.arange(len(rows)), rows] = False
        has[rows] = pos.any(1)
        gap = (s.max(1).values - torch.logsumexp(s.masked_fill(~pos, -math.inf), 1)) / math.log(2)
        under[rows] = has[rows] & (gap > 64)
    return under, has


def _tiles(under, y):
    """The shares of the N x M tiles of the pass over every reference, and of the exact
    pass's positives-only blocks (see the module docstring)."""
    n = y.shape[0]
    total = math.ceil(n / BLOCK) ** 2
    flagged = torch.sort(y[under], stable=True).values
    counts = torch.bincount(y, minlength=int(y.max()) + 1)
    cum = torch.cat([torch.zeros(1, dtype=counts.dtype), counts.cumsum(0)])
    pos_tiles = sum(math.ceil(int(cum[b[-1] + 1] - cum[b[0]]) / BLOCK)
                    for b in flagged.split(BLOCK) if len(b))
    return math.ceil(int(under.sum()) / BLOCK) * math.ceil(n / BLOCK) / total, pos_tiles / total


def _record(name, d, t, classes, n, under, has, y, before=None):
    both, pos = _tiles(under, y)
    rec = {"embeddings": name, "D": d, "T": t, "classes": classes, "N": n,
           "rows_without_positive": float((~has).double().mean()),
           "rows": float(under.double().mean()), "tiles_both_sums": both,
           "tiles_positives_pass": pos}
    if before is not None:
        rec["blocks_before"] = before
    return rec


def point(d, t, classes, unit, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, d, generator=g, dtype=torch.float64)
    if unit:
        x = torch.nn.functional.normalize(x, dim=1)
    y = torch.randint(0, classes, (N,), generator=g)
    under, has = _flags(x, y, t, N)
    before = float((under | ~has).view(-1, BLOCK).any(1).double().mean())
    return _record("unit" if unit else "N(0, 1)", d, t, classes, N, under, has, y, before)


def target_point(unit):
    """gpu_perf.py's inputs (its ``Run.inputs``, seed 0) at the target shape."""
    n, d, c, t = (TARGET[k] for k in ("n", "d", "classes", "t"))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g) * 0.3
    if unit:
        x = torch.nn.functional.normalize(x, dim=1)
    y = torch.randint(0, c, (n,), generator=g)
    under, has = _flags(x.to(torch.bfloat16).float(), y, t, TARGET["chunk"])
    return _record("gpu_perf unit" if unit else "gpu_perf N(0, 0.3^2)", d, t, c, n, under,
                   has, y)


def main():
    env = env_info("cpu")   # before the results file is rewritten (git status)
    rows = [point(d, t, c, unit) for unit in (False, True) for d, t, c in POINTS]
    rows += [target_point(unit) for unit in (False, True)]
    with open(OUT, "w") as f:
        json.dump({"env": env, "block_m": BLOCK, "points": rows}, f, indent=1)
    for r in rows:
        print(f"{r['embeddings']:21s} N={r['N']:5d} D={r['D']:3d} T={r['T']:<5} "
              f"C={r['classes']:<5} rows {r['rows']:6.1%}  tiles: both sums "
              f"{r['tiles_both_sums']:6.1%}, positives pass {r['tiles_positives_pass']:6.2%}")


if __name__ == "__main__":
    main()
