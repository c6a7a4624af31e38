"""Regression budgets of the static SASS model (checked by tests/test_sass.py).

MUFU.EX2 per query-reference pair in the main loop, per kernel family, *predicted from
compiled SASS* (sm_90, triton of bench/results/sass_sm90.json) at the first GPU autotune
config that fits (forward 128 x 128, 8 warps, 3 stages; backward 128 x 64, 8 warps, 2
stages; smaller tiles pay the per-row rescale exponentials over fewer pairs). Each budget
sits a little above today's count, so that a change that adds exponentials fails CI:

| family          | v1   | today | budget | why today's count                            |
|-----------------|-----:|------:|-------:|----------------------------------------------|
| fwd (lse)       | 2.12 |  1.03 |   1.20 | one exp2 per pair [a], plus the row rescale  |
| fwd (class)     | 1.06 |  1.06 |   1.20 | one online lse; the mass reuses its exp      |
| bwd (lse)       | 2.00 |  1.00 |   1.10 | p+ = p exp(lse_all - lse_pos): a row factor [b] |
| bwd (class)     | 1.00 |  1.00 |   1.10 | p recomputed once                            |
| bwd (symmetric) |    - |  1.00 |   1.10 | ds_kj and ds_jk from one exp2 [c]            |
| anchor (FA-2)   | 1.06 |  1.06 |   1.20 | one exp per pair, plus the row rescale       |

[a] the positives' sum is taken from the same exponentials under one running max; the
rare exact pass over rows whose positives underflow is a second launch, not in this
count. [b] rows whose gap exceeds 2^64 get their positives' term from a fix-up launch
that skips every tile without such a row; not in this count. [c] the batch loss: one
kernel in place of a dq and a dr kernel, whose two directions of a pair differ by a factor
of rank one (``rows.one_exp_rows``); where the rows' normalizers spread too far for one
fp32 exp2 a second kernel with two per pair runs instead (2.00, not in this count).

Known spills: variants of the CI set (tests/test_sass.py) that spill today, with the stack
bytes they may not exceed. Any other variant with a spill (LOCAL / STACK bytes, or an
LDL / STL in its code) fails CI; a listed one fails when its stack grows. Today no variant
of the CI set spills, and 28 of the 280 Triton variants do (the ``spills`` and
``stack_bytes`` fields of bench/results/sass_sm90.json): 22 class backward kernels (8-280
B, fp32 the most), 3 fp32 symmetric backwards (16-112 B), 2 fp32 dr kernels at 64 x 64
(40-56 B) and one fp16 32 x 32 dq kernel (8 B). No forward spills (the class forward
since its references come sorted by class, its mass dot is two TF32 dots and its class
tile is 32 wide), and no bf16 / fp16 non-class kernel at its best-predicted config.
"""

MUFU_EX2_BUDGET = {
    ("fwd", False): 1.20,
    ("fwd", True): 1.20,
    ("bwd", False): 1.10,
    ("bwd", True): 1.10,
    ("bwd_sym", False): 1.10,
    ("anchor", False): 1.20,
}

# predicted % of peak may fall at most this fraction below the committed figure
PEAK_TOLERANCE = 0.10

# variant name -> stack / local bytes allowed (today's value); see the module docstring
KNOWN_SPILLS = {}


def ex2_budget(row):
    kind = "bwd_sym" if row.get("ref_major") == "sym" else row["kind"]
    return MUFU_EX2_BUDGET.get((kind, bool(row["cls"])))


def spill_allowance(name):
    return KNOWN_SPILLS.get(name)
