"""Every misuse raises ValueError or TypeError naming the argument."""
import fractions

import numpy as np
import pytest
import torch

import nbkernels
from nbkernels import _validation as check

X = torch.randn(6, 4)
Y = torch.tensor([0, 1, 0, 1, 2, 2])
R = torch.randn(5, 4)
RY = torch.tensor([0, 1, 2, 0, 1])


def nca(**kw):
    args = dict(embeddings=X, labels=Y)
    args.update(kw)
    return nbkernels.nca_loss(args.pop("embeddings"), args.pop("labels"), **args)


@pytest.mark.parametrize("kw,exc,match", [
    (dict(embeddings=torch.randn(6)), ValueError, "embeddings must be 2-D"),
    (dict(embeddings=torch.randn(2, 3, 4)), ValueError, "embeddings must be 2-D"),
    (dict(embeddings=[[1.0]]), TypeError, "embeddings must be a torch.Tensor"),
    (dict(embeddings=torch.ones(6, 4, dtype=torch.long)), TypeError, "embeddings must be a floating"),
    (dict(labels=Y[:5]), ValueError, r"labels must have shape \(6,\)"),
    (dict(labels=Y.float()), TypeError, "labels must have an integer dtype"),
    (dict(labels=Y.bool()), TypeError, "labels must have an integer dtype"),
    (dict(temperature=0.0), ValueError, "temperature must be finite and > 0"),
    (dict(temperature=-1.0), ValueError, "temperature must be finite and > 0"),
    (dict(temperature=float("inf")), ValueError, "temperature must be finite and > 0"),
    (dict(temperature=torch.tensor(-0.5)), ValueError, "temperature must be finite and > 0"),
    (dict(temperature=torch.tensor([0.5])), ValueError, "temperature must be a 0-dim"),
    (dict(temperature="hot"), TypeError, "temperature must be a float"),
    (dict(temperature=True), TypeError, "temperature must be a float.*got bool"),
    (dict(metric="manhattan"), ValueError, "metric must be one of"),
    (dict(reduction="avg"), ValueError, "reduction must be one of"),
    (dict(backend="jax"), ValueError, "backend must be one of"),
    (dict(ref_embeddings=R), ValueError, "ref_embeddings was given without ref_labels"),
    (dict(ref_labels=RY), ValueError, "ref_labels was given without ref_embeddings"),
    (dict(ref_embeddings=torch.randn(5, 3), ref_labels=RY), ValueError,
     "ref_embeddings must have the feature dimension"),
    (dict(ref_embeddings=R, ref_labels=RY[:4]), ValueError, r"ref_labels must have shape \(5,\)"),
    (dict(ref_embeddings=R, ref_labels=RY.to("meta")), ValueError, "one device"),
])
def test_nca_loss_rejects(kw, exc, match):
    with pytest.raises(exc, match=match):
        nca(**kw)


def test_error_message_names_expected_and_given():
    with pytest.raises(ValueError) as info:
        nca(metric="manhattan")
    assert "sqeuclidean" in str(info.value) and "manhattan" in str(info.value)


@pytest.mark.parametrize("args,kw,exc,match", [
    ((X, R, RY, 3), dict(exclude_self=True), ValueError, "exclude_self=True needs"),
    ((X, R, RY, 2), {}, ValueError, r"ref_labels must lie in \[0, num_classes=2\)"),
    ((X, R, RY - 1, 3), {}, ValueError, "ref_labels must lie in"),
    ((X, R, RY, 0), {}, ValueError, "num_classes must be >= 1"),
    ((X, R, RY, 3.0), {}, TypeError, "num_classes must be an int"),
    ((X, R[:0], RY[:0], 3), {}, ValueError, "at least 1 row"),
    ((X[:1], R[:1], RY[:1], 3), dict(exclude_self=True), ValueError, "at least 2 row"),
    ((X, R, RY, 3), dict(exclude_self=1), TypeError, "exclude_self must be a bool"),
    ((X, torch.randn(5, 2), RY, 3), {}, ValueError, "feature dimension"),
])
def test_soft_knn_rejects(args, kw, exc, match):
    with pytest.raises(exc, match=match):
        nbkernels.soft_knn_predict(*args, **kw)


def test_prototype_loss_rejects():
    with pytest.raises(ValueError, match="prototype_labels was given without prototypes"):
        nbkernels.prototype_loss(X, Y, prototype_labels=RY)
    with pytest.raises(ValueError, match="prototypes must have the feature dimension"):
        nbkernels.prototype_loss(X, Y, prototypes=torch.randn(3, 5))
    with pytest.raises(ValueError, match=r"prototype_labels must have shape \(3,\)"):
        nbkernels.prototype_loss(X, Y, prototypes=torch.randn(3, 4), prototype_labels=RY)


@pytest.mark.parametrize("kw,exc,match", [
    (dict(size=0, dim=4, num_classes=3), ValueError, "size must be >= 1"),
    (dict(size=4.0, dim=4, num_classes=3), TypeError, "size must be an int"),
    (dict(size=4, dim=0, num_classes=3), ValueError, "dim must be >= 1"),
    (dict(size=4, dim=4, num_classes=0), ValueError, "num_classes must be >= 1"),
    (dict(size=4, dim=4, num_classes=3, metric="l1"), ValueError, "metric must be one of"),
    (dict(size=4, dim=4, num_classes=3, temperature=0), ValueError, "temperature"),
    (dict(size=4, dim=4, num_classes=3, dtype="float32"), TypeError, "dtype must be a floating"),
    (dict(size=4, dim=4, num_classes=3, dtype=None), TypeError, "dtype must be a floating"),
    (dict(size=4, dim=4, num_classes=3, dtype=torch.int64), TypeError, "dtype must be a floating"),
])
def test_cache_constructor_rejects(kw, exc, match):
    with pytest.raises(exc, match=match):
        nbkernels.NeighborCache(**kw)


def test_cache_rejects_wrong_batches():
    cache = nbkernels.NeighborCache(8, 4, 3)
    with pytest.raises(ValueError, match="dimension dim=4"):
        cache(torch.randn(2, 5), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, num_classes=3\)"):
        cache(torch.randn(2, 4), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"labels must have shape \(2,\)"):
        cache.push(torch.randn(2, 4), torch.tensor([0]))
    cache.push(torch.randn(2, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="weight must be a number in"):
        cache.predict(torch.randn(2, 4), weight=1.5)
    with pytest.raises(ValueError, match="model_probs must have shape"):
        cache.predict(torch.randn(2, 4), model_probs=torch.rand(2, 4))


def test_module_constructors_reject():
    with pytest.raises(ValueError, match="metric must be one of"):
        nbkernels.NCALoss(metric="hamming")
    with pytest.raises(ValueError, match="temperature must be finite"):
        nbkernels.NCALoss(temperature=-2.0)
    with pytest.raises(ValueError, match="num_classes and dim go together"):
        nbkernels.PrototypeLoss(num_classes=3)
    with pytest.raises(TypeError, match="dim must be an int, got float"):
        nbkernels.PrototypeLoss(num_classes=3, dim=4.0)
    with pytest.raises(ValueError, match="dim must be >= 1, got 0"):
        nbkernels.PrototypeLoss(num_classes=3, dim=np.int64(0))
    with pytest.raises(TypeError, match="num_classes must be an int, got bool"):
        nbkernels.PrototypeLoss(num_classes=True, dim=4)
    # the scale-out options at construction, not at the first forward (a process group
    # is only needed then)
    with pytest.raises(ValueError, match="chunk_size must be >= 1, got 0"):
        nbkernels.NCALoss(chunk_size=0)
    with pytest.raises(TypeError, match="distributed must be a bool, got str"):
        nbkernels.NCALoss(distributed="x")
    with pytest.raises(TypeError, match="distributed must be a bool"):
        nbkernels.PrototypeLoss(distributed=1)
    with pytest.raises(TypeError, match="learn_temperature must be a bool, got int"):
        nbkernels.NCALoss(learn_temperature=1)
    assert nbkernels.NCALoss(distributed=True).scale_out["distributed"] is True


def test_prototype_module_accepts_numpy_integers():
    crit = nbkernels.PrototypeLoss(num_classes=np.int64(3), dim=np.int64(4))
    assert crit.prototypes.shape == (3, 4)
    assert torch.isfinite(crit(X, Y))


# ------------------------------------------------------ NumPy scalars are numbers


@pytest.mark.parametrize("value", [4, np.int64(4), np.int32(4), np.uint8(4)])
def test_integer_accepts_numpy_integers(value):
    got = check.integer("dim", value, low=1)
    assert got == 4 and type(got) is int
    assert check.num_classes(value) == 4


@pytest.mark.parametrize("value,exc,match", [
    (True, TypeError, "dim must be an int, got bool"),
    (np.bool_(True), TypeError, "dim must be an int, got bool"),
    (4.0, TypeError, "dim must be an int, got float"),
    (np.float32(4), TypeError, "dim must be an int, got float32"),
    (0, ValueError, "dim must be >= 1, got 0"),
    (np.int64(0), ValueError, "dim must be >= 1, got 0"),
])
def test_integer_rejects(value, exc, match):
    with pytest.raises(exc, match=match):
        check.integer("dim", value, low=1)


@pytest.mark.parametrize("value", [0.3, np.float32(0.3), np.float64(0.3), np.float16(0.3),
                                   fractions.Fraction(3, 10)])
def test_real_accepts_numpy_floats(value):
    got = check.real("weight", value, 0, 1)
    assert type(got) is float and got == pytest.approx(0.3, rel=1e-3)
    assert check.real("weight", np.int64(1), 0, 1) == 1.0


@pytest.mark.parametrize("value,exc,match", [
    (True, TypeError, "weight must be a real number, got bool"),
    ("0.3", TypeError, "weight must be a real number, got str"),
    (np.float32(1.5), ValueError, r"weight must be a number in \[0, 1\], got 1.5"),
    (float("nan"), ValueError, r"weight must be a number in \[0, 1\], got nan"),
    (-(10 ** 400), ValueError, r"weight must be a number in \[0, 1\], got -inf"),
])
def test_real_rejects(value, exc, match):
    with pytest.raises(exc, match=match):
        check.real("weight", value, 0, 1)


def test_num_classes_accepts_numpy_integers_in_functions():
    probs = nbkernels.soft_knn_predict(X, R, RY, np.int64(3), temperature=0.5)
    torch.testing.assert_close(probs, nbkernels.soft_knn_predict(X, R, RY, 3, temperature=0.5))


def test_chunk_size_accepts_numpy_integers():
    """As num_classes, size and dim do (it is checked as an int and used as one)."""
    want = nbkernels.soft_knn_predict(X, R, RY, 3, temperature=0.5, chunk_size=2)
    got = nbkernels.soft_knn_predict(X, R, RY, 3, temperature=0.5, chunk_size=np.int64(2))
    torch.testing.assert_close(got, want)
    cache = nbkernels.NeighborCache(8, X.shape[1], 3, chunk_size=np.int32(3))
    assert cache.chunk_size == 3 and type(cache.chunk_size) is int


# ------------------------------------------------------ temperature: any real, range


@pytest.mark.parametrize("t", [np.float32(0.5), np.float64(0.5), np.float16(0.5), np.int64(1), 1,
                               fractions.Fraction(1, 2)])
def test_temperature_accepts_any_real_scalar(t):
    want = nbkernels.nca_loss(X, Y, temperature=float(t))
    torch.testing.assert_close(nbkernels.nca_loss(X, Y, temperature=t), want)
    crit = nbkernels.NCALoss(temperature=t)
    torch.testing.assert_close(crit(X, Y), want)
    assert nbkernels.NCALoss(temperature=t, learn_temperature=True).temperature.item() == \
        pytest.approx(float(t))


def test_temperature_is_made_in_the_accumulation_dtype():
    for dtype in (torch.float32, torch.float64):
        t = check.temperature(np.float32(0.5), torch.device("cpu"), dtype)
        assert t.dtype == dtype and t.item() == 0.5
    # a tensor is cast (the one cast every backend relies on), differentiably: its
    # gradient comes back in its own dtype
    half = torch.tensor(0.5, dtype=torch.float16, requires_grad=True)
    made = check.temperature(half, torch.device("cpu"), torch.float32)
    assert made.dtype == torch.float32 and made.item() == 0.5
    (3.0 * made).backward()
    assert half.grad.dtype == torch.float16 and half.grad.item() == 3.0


@pytest.mark.parametrize("t", [1e39, 3.5e38, 10 ** 39, 1e-40, 1e-45, np.float64(1e-39)])
def test_temperature_out_of_the_float32_range_is_rejected(t):
    x = X.double()
    for inputs in (X, X.half(), X.bfloat16()):
        with pytest.raises(ValueError, match=r"temperature must be in \[1\.2e-38, 3\.4e38\] for "
                           r"float16/bfloat16/float32 inputs \(accumulated in float32\), got"):
            nbkernels.nca_loss(inputs, Y, temperature=t, backend="torch")
    with pytest.raises(ValueError, match=r"temperature must be in \[1\.2e-38, 3\.4e38\].*got"):
        nbkernels.soft_knn_predict(X, R, RY, 3, temperature=t)
    with pytest.raises(ValueError, match=r"temperature must be in \[1\.2e-38, 3\.4e38\]"):
        nbkernels.NCALoss(temperature=t, learn_temperature=isinstance(t, float) and t < 1)(X, Y)
    # fp64 inputs accumulate in fp64, where these are normal numbers
    assert torch.isfinite(nbkernels.nca_loss(x, Y, temperature=t, backend="torch"))


def test_temperature_message_names_the_range_and_value():
    with pytest.raises(ValueError) as info:
        check.temperature(1e-40, torch.device("cpu"), torch.float32)
    assert str(info.value) == ("temperature must be in [1.2e-38, 3.4e38] for float16/bfloat16/"
                               "float32 inputs (accumulated in float32), got 1e-40")
    with pytest.raises(ValueError, match=r"\[2\.2e-308, 1\.8e308\] for float64 inputs "
                       r"\(accumulated in float64\), got 1e-320"):
        check.temperature(1e-320, torch.device("cpu"), torch.float64)
    with pytest.raises(ValueError, match=r"temperature must be in \[2\.2e-308, 1\.8e308\].*got an "
                       "int of 401 digits"):
        check.temperature(10 ** 400, torch.device("cpu"), torch.float64)
    with pytest.raises(ValueError, match="finite and > 0, got -1"):
        check.temperature(np.int64(-1), torch.device("cpu"), torch.float64)


@pytest.mark.parametrize("t,ok", [
    (torch.finfo(torch.float32).tiny, True), (torch.finfo(torch.float32).max, True),
    (3.4028235e38, True),  # rounds to the fp32 max
    (3.4028236e38, False),  # rounds to inf in fp32
    (torch.finfo(torch.float32).tiny / 2, False),
])
def test_temperature_float32_range_edges(t, ok):
    if ok:
        got = check.temperature(t, torch.device("cpu"), torch.float32)
        assert torch.isfinite(got) and torch.isfinite(1 / got) and got > 0
    else:
        with pytest.raises(ValueError, match="temperature must be in"):
            check.temperature(t, torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("t", [torch.tensor(1e-40, dtype=torch.float64),
                               torch.tensor(1e39, dtype=torch.float64)])
def test_tensor_temperature_out_of_the_float32_range_is_rejected(t):
    with pytest.raises(ValueError, match=r"temperature must be in \[1\.2e-38, 3\.4e38\] for "
                       r"float16/bfloat16/float32 inputs \(accumulated in float32\), got .*float64 tensor"):
        nbkernels.nca_loss(X, Y, temperature=t)
    assert torch.isfinite(nbkernels.nca_loss(X.double(), Y, temperature=t))
    with pytest.raises(ValueError, match="temperature must be finite and > 0, got nan"):
        nbkernels.nca_loss(X, Y, temperature=torch.tensor(float("nan")))


def test_constructors_check_temperature_against_float64():
    # the inputs' dtype is unknown at construction: the widest range applies there
    assert nbkernels.NCALoss(temperature=1e-40)(X.double(), Y).isfinite()
    with pytest.raises(ValueError, match=r"temperature must be in \[2\.2e-308, 1\.8e308\] for "
                       "float64 inputs"):
        nbkernels.PrototypeLoss(temperature=1e-320)
    with pytest.raises(ValueError, match="temperature must be finite and > 0"):
        nbkernels.PrototypeLoss(temperature=np.float32("inf"))


# ------------------------------------------------------ seeds


@pytest.mark.parametrize("value", [0, 1, np.int64(7), np.uint64(2**64 - 1), 2**63 - 1, 2**64 - 1])
def test_seed_accepts_what_manual_seed_takes(value):
    got = check.seed(value)
    assert type(got) is int and got == int(value)
    torch.Generator().manual_seed(got)


@pytest.mark.parametrize("value,exc,match", [
    (2**70, ValueError, r"seed must be in \[-2\*\*63, 2\*\*64 - 1\].*got 1180591620717411303424"),
    (2**64, ValueError, r"seed must be in \[-2\*\*63, 2\*\*64 - 1\]"),
    (-2**63 - 1, ValueError, r"seed must be in \[-2\*\*63, 2\*\*64 - 1\].*got -9223372036854775809"),
    (True, TypeError, "seed must be an int, got bool"),
    (1.0, TypeError, "seed must be an int, got float"),
    ("1", TypeError, "seed must be an int, got str"),
    (None, TypeError, "seed must be an int, got NoneType"),
])
def test_seed_rejects(value, exc, match):
    with pytest.raises(exc, match=match):
        check.seed(value)


def test_seed_optional():
    assert check.seed(None, optional=True) is None
    assert check.seed(np.int32(3), optional=True) == 3
    with pytest.raises(TypeError, match="seed must be an int or None, got str"):
        check.seed("1", optional=True)
