"""What bench/gpu_perf.py times of the forwards' Gluon main passes
(``nbkernels.backends.triton.gluon_lse`` and ``gluon_class``, the opt-in variant
"sm90_gluon" of kinds "fwd_main" and "fwd_class_main"): the loss forward's forms that the
latency model has fastest under the running triton, each as a per-row loss, the class
forward's predicted time, and why they cannot run on a device. Gluon is imported only to run it,
so that another triton's missing Gluon API is a recorded reason, not an import error."""
import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def results_path(stem, version=None):
    """bench/results/<stem>_sm90[_triton<major><minor>].json: the Gluon models' results
    under triton ``version`` (None: the running one), untagged from 3.9."""
    if version is None:
        from nbkernels.backends import variants
        version = variants.triton_version()
    tag = "" if version >= (3, 9) else f"_triton{version[0]}{version[1]}"
    return ROOT / "bench" / "results" / f"{stem}_sm90{tag}.json"


def candidates(top=2):
    """The ``top`` forms of the Gluon main pass that the latency model has fastest under
    the running triton (bench/results/gluon_fwd_sm90*.json; the first is the one
    ``gluon_lse.FORMS`` gives it, tests/test_gluon_fwd.py): [(fields, name, seconds)]."""
    path = results_path("gluon_fwd")
    forms = json.loads(path.read_text())["forms"] if path.exists() else []
    forms = sorted(forms, key=lambda r: r["predicted_latency_model"]["time_s"])[:top]
    return [(r["form"], r["name"], r["predicted_latency_model"]["time_s"]) for r in forms]


def class_prediction():
    """The latency model's time of the class forward's Gluon main pass under the running
    triton (bench/results/gluon_class_probe_sm90*.json: the batch, self pair excluded,
    as gpu_perf's soft_knn_predict), or None."""
    path = results_path("gluon_class_probe")
    if not path.exists():
        return None
    rows = [r for r in json.loads(path.read_text())["rows"]
            if r.get("self_mode") == 2 and r.get("kernel")]
    return rows[0]["predicted_ms"] / 1e3 if rows else None


def unavailable(device):
    """Why the Gluon main passes cannot run on ``device`` (None if they can)."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] != 9:
        return "needs an sm_90 CUDA device (Gluon has no interpreter)"
    try:
        from nbkernels.backends.triton import gluon_class, gluon_lse  # noqa: F401
    except Exception as e:  # another triton's Gluon API is a result too
        return f"does not import with this triton: {type(e).__name__}: {str(e)[:200]}"
    return None


class Forward:
    """The batch's per-row NCA losses with the Gluon main pass in ``form`` (fields of
    ``gluon_lse.Form``) and nbkernels' exact pass as backend "triton"; other backends
    through ``other(x, y, backend, t)``."""
    def __init__(self, form, other):
        self.form, self.other = form, other

    def __call__(self, x, y, backend, t=0.1):
        if backend != "triton":
            return self.other(x, y, backend, t)
        import gluon_fwd
        return gluon_fwd.nca_rows(x, y, t, gluon_fwd.Form(**self.form))
