"""Every misuse raises ValueError or TypeError naming the argument."""
import pytest
import torch

import nbkernels

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
