"""bench/sass/ladder.py, the latency model's ladder: minimal forms of the forward's loop
that a GPU times (bench/gpu_perf.sh) against their predictions, so that the model's error
can be pinned to a part of the loop. Checked here: each rung's compiled loop holds what
it is meant to (the exp rung no MMA and no load, the MMA rung no exp), the committed
predictions cover every rung under triton 3.6 to 3.9, the timing path runs through the
Triton interpreter (the Triton rungs; Gluon has none), and the comparison predicts a
rung at the SM clock sampled while it ran."""
import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from bench.sass import build  # noqa: E402

REASON = build.unavailable_reason()


def _loop_ops(rung):
    import torch

    from bench.sass import latency, ladder
    meta = torch.empty(0, dtype=torch.bfloat16, device="meta")
    values = ladder._values(rung, meta, meta, torch.empty(0, dtype=torch.float32, device="meta"))
    name, fn, bm, bn, w, s = rung
    c = build.compile_triton(ladder._kernel(rung), values, w, s, f"test_ladder_{name}")
    return collections.Counter(o.base for o in latency.simulate_cubin(
        c.cubin, c.name, c.shared, w).ops)


@pytest.mark.skipif(bool(REASON), reason=f"static SASS model unavailable: {REASON}")
def test_each_rung_holds_what_it_is_meant_to():
    from bench.sass import ladder
    rungs = {r[0]: r for r in ladder.RUNGS}
    exp = _loop_ops(rungs["exp"])
    assert exp["MUFU"] == 64 and not exp["HGMMA"] and not exp["LDGSTS"] and not exp["LDG"]
    mma = _loop_ops(rungs["mma"])
    assert mma["HGMMA"] == 8 and not mma["MUFU"]
    plain = _loop_ops(rungs["plain"])
    assert plain["HGMMA"] == 8 and plain["MUFU"] == 64


def test_predictions_cover_every_rung_under_each_triton():
    from bench.sass import ladder
    names = [r[0] for r in ladder.RUNGS]
    for version in ((3, 6), (3, 7), (3, 8), (3, 9)):
        data = json.loads(ladder.results_path(version).read_text())
        assert data["shape"] == {"n": 65536, "m": 65536, "d": 128, "dtype": "bf16"}
        assert [r["rung"] for r in data["rungs"]] == names
        for r in data["rungs"]:
            assert "error" not in r, (version, r)
            assert r["predicted_s"] > 0 and r["ctas_per_sm"] >= 1
        # the exp rung is near the exp unit's bound (16 a clock per SM: 1/16 cycle a pair)
        exp = data["rungs"][0]
        assert 1 / 16 <= exp["cycles_per_pair"] < 1.25 / 16


def test_timing_path_through_the_interpreter(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "sass" / "ladder.py"), "--time",
                           "--dry", "--out", str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "ladder.json").read_text())
    assert data["env"]["dry"] is True
    status = {r["rung"]: r["status"] for r in data["records"]}
    assert status == {"exp": "ok", "mma": "ok", "plain": "ok", "ahead": "ok",
                      "plain_2cta": "ok", "gluon_ahead": "skipped"}
    assert all(r["time_s"]["median"] > 0 for r in data["records"] if r["status"] == "ok")


def test_compare_predicts_each_rung_at_its_sampled_clock(tmp_path):
    from bench.sass import ladder, model
    pred = {r["rung"]: r for r in json.loads(ladder.results_path((3, 6)).read_text())["rungs"]}
    exp, mma = pred["exp"]["predicted_s"], pred["mma"]["predicted_s"]
    meas = {"env": {"triton": "3.6.0"}, "records": [
        {"rung": "exp", "config": "c", "status": "ok", "time_s": {"median": 2 * exp},
         "sm_clock_mhz": 1e-6 * model.CLOCK_HZ / 2},
        {"rung": "mma", "config": "c", "status": "ok", "time_s": {"median": 3 * mma}},
        {"rung": "plain", "config": "c", "status": "error", "reason": "x"}]}
    path = tmp_path / "ladder.json"
    path.write_text(json.dumps(meas))
    rows = [r.split(" | ") for r in ladder.compare(path).splitlines()[2:]]
    # at half the model's clock the prediction doubles: measured / predicted is 1
    assert rows[0][0] == "| exp" and rows[0][-1] == "1.00 |"
    assert rows[1][0] == "| mma" and rows[1][-1] == "3.00 |"
    assert rows[2][0] == "| plain" and rows[2][3] == "error"
    assert "did not run" in ladder.compare(tmp_path / "none.json")
