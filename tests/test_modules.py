"""NCALoss and PrototypeLoss modules."""
import math

import torch

import nbkernels
from helpers import make_batch


def test_nca_module_matches_function():
    x, y = make_batch(10, 4, 3)
    crit = nbkernels.NCALoss(temperature=0.3, metric="cosine")
    torch.testing.assert_close(crit(x, y), nbkernels.nca_loss(x, y, temperature=0.3,
                                                              metric="cosine"))
    r, ry = make_batch(7, 4, 3, seed=1)
    torch.testing.assert_close(
        crit(x, y, r, ry),
        nbkernels.nca_loss(x, y, ref_embeddings=r, ref_labels=ry, temperature=0.3,
                           metric="cosine"))


def test_learned_temperature_is_log_parametrized_and_trained():
    x, y = make_batch(16, 4, 3, dtype=torch.float32)
    crit = nbkernels.NCALoss(temperature=0.5, learn_temperature=True)
    assert math.isclose(crit.temperature.item(), 0.5, rel_tol=1e-6)
    names = [n for n, _ in crit.named_parameters()]
    assert names == ["log_temperature"]
    loss = crit(x, y)
    loss.backward()
    t = torch.tensor(0.5, requires_grad=True)
    nbkernels.nca_loss(x, y, temperature=t, backend="reference").backward()
    # d loss / d log T = T * d loss / d T
    torch.testing.assert_close(crit.log_temperature.grad.float(), 0.5 * t.grad, rtol=1e-4,
                               atol=1e-6)


def test_prototype_module_learned_proxies():
    torch.manual_seed(0)
    crit = nbkernels.PrototypeLoss(num_classes=4, dim=3, metric="cosine", temperature=0.2)
    assert crit.prototypes.shape == (4, 3)
    x, y = make_batch(12, 3, 4, dtype=torch.float32)
    opt = torch.optim.SGD(crit.parameters(), lr=0.5)
    first = crit(x, y).item()
    for _ in range(30):
        opt.zero_grad()
        loss = crit(x, y)
        loss.backward()
        opt.step()
    assert loss.item() < first


def test_prototype_module_batch_means():
    x, y = make_batch(12, 3, 2)
    crit = nbkernels.PrototypeLoss(temperature=0.4)
    torch.testing.assert_close(crit(x, y), nbkernels.prototype_loss(x, y, temperature=0.4))


def test_training_reduces_nca_loss():
    torch.manual_seed(0)
    x, y = make_batch(40, 8, 4, dtype=torch.float32)
    net = torch.nn.Linear(8, 4)
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    crit = nbkernels.NCALoss(temperature=0.5)
    first = crit(net(x), y).item()
    for _ in range(50):
        opt.zero_grad()
        loss = crit(net(x), y)
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def test_prototype_module_repr():
    crit = nbkernels.PrototypeLoss(num_classes=10, dim=64, metric="cosine", temperature=0.1)
    assert crit.extra_repr() == ("num_classes=10, dim=64, temperature=0.1, metric='cosine', "
                                 "reduction='mean', backend='auto'")
    assert repr(crit) == f"PrototypeLoss({crit.extra_repr()})"
    crit = nbkernels.PrototypeLoss(temperature=0.25, learn_temperature=True, reduction="sum",
                                   backend="torch")
    assert crit.extra_repr() == ("temperature=0.25 (learned), metric='sqeuclidean', "
                                 "reduction='sum', backend='torch'")
    with torch.no_grad():
        crit.log_temperature.fill_(math.log(0.5))
    assert "temperature=0.5 (learned)" in repr(crit)
