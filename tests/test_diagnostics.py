"""nbkernels.diagnostics: monitor quantities by hand, chance levels, overfit check,
broken setups, plots."""
import gc
import math
import warnings
import weakref

import numpy as np
import pytest
import torch
from torch import nn

import nbkernels
from nbkernels.diagnostics import (
    TrainingMonitor,
    chance_level,
    check_initial_loss,
    overfit_small_batch,
    plot_grad_norms,
    plot_history,
)


def tiny_net():
    """2 -> 3 (ReLU) -> 1 with weights chosen so that every quantity is easy by hand."""
    net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]))
        net[0].bias.copy_(torch.tensor([0.0, 0.0, -1.0]))
        net[2].weight.copy_(torch.tensor([[1.0, -1.0, 2.0]]))
        net[2].bias.copy_(torch.tensor([0.5]))
    return net


X = torch.tensor([[1.0, 2.0], [3.0, -1.0]])


@pytest.fixture(autouse=True)
def one_thread():
    # The networks are tiny: threads only add synchronisation (and contention on CI).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_monitor_matches_hand_computed_values():
    net = tiny_net()
    mon = TrainingMonitor(net)
    # h = relu(W1 x + b1): sample 1 [1, 2, 0], sample 2 [3, 0, 0]; unit 3 is dead for both.
    # y = w2 . h + 0.5: -0.5 and 3.5, loss = sum y = 3.
    loss = net(X).sum()
    loss.backward()
    rec = mon.record(0, loss, test_loss=1.25)
    assert rec.train_loss == pytest.approx(3.0)
    assert rec.test_loss == 1.25
    # ||W1||^2 = 4, ||b1||^2 = 1, ||w2||^2 = 6, b2^2 = 0.25
    assert rec.param_norm == pytest.approx(math.sqrt(11.25))
    # layer 2: dL/dw2 = h1 + h2 = [4, 2, 0], dL/db2 = 2  -> norm sqrt(24), max 4
    # layer 0: dL/dh_n = w2 masked by relu': [1, -1, 0] and [1, 0, 0]
    #   dL/dW1 = [[4, 1], [-1, -2], [0, 0]], dL/db1 = [2, -1, 0] -> norm sqrt(27), max 4
    assert rec.layer_grad_norm == pytest.approx({"0": math.sqrt(27), "2": math.sqrt(24)})
    assert rec.layer_grad_max == pytest.approx({"0": 4.0, "2": 4.0})
    assert rec.grad_norm == pytest.approx(math.sqrt(51))
    assert rec.dead_relu == pytest.approx(1 / 3)
    assert rec.layer_dead_relu == pytest.approx({"1": 1 / 3})
    assert rec.tanh_saturation is None and rec.sigmoid_saturation is None
    assert rec.nonfinite is None
    assert mon.series("param_norm") == [rec.param_norm]


def test_dead_units_accumulate_over_forwards_and_skip_no_grad_passes():
    net = tiny_net()
    mon = TrainingMonitor(net)
    with torch.no_grad():
        net(torch.tensor([[-5.0, -5.0]]))  # would revive unit 3; not counted (no grad)
    net(X).sum().backward()
    assert mon.record(0, 0.0).dead_relu == pytest.approx(1 / 3)
    # two training forwards before one record: unit 3 is alive in the second
    net(X).sum().backward()
    net(torch.tensor([[-5.0, -5.0]])).sum().backward()
    assert mon.record(1, 0.0).dead_relu == 0.0
    mon.close()
    net(X).sum().backward()  # hooks removed: nothing collected
    assert mon.record(2, 0.0).dead_relu is None


class _Activations(nn.Module):
    def __init__(self):
        super().__init__()
        self.t, self.s = nn.Tanh(), nn.Sigmoid()

    def forward(self, x):
        return self.t(x) + self.s(x)


def test_tanh_and_sigmoid_saturation():
    mon = TrainingMonitor(_Activations())
    x = torch.tensor([[0.0, 10.0, -10.0, 0.5], [3.0, -3.0, 6.0, 0.0]])
    mon.model(x).sum()
    rec = mon.record(0, 0.0)
    # tanh: |tanh x| > 0.99 iff |x| > 2.65: 10, -10, 3, -3, 6
    assert rec.tanh_saturation == pytest.approx(5 / 8)
    # sigmoid: |2 s(x) - 1| = |tanh(x / 2)| > 0.99 iff |x| > 5.29: 10, -10, 6
    assert rec.sigmoid_saturation == pytest.approx(3 / 8)
    assert rec.param_norm == 0.0 and rec.layer_grad_norm == {}


@pytest.mark.parametrize("breakage, where", [
    ("nan_weight", "forward output of layer '2'"),
    ("inf_input", "forward output of layer '0'"),
    ("inf_grad", "gradient of layer '0'"),
    ("inf_loss", "loss"),
])
def test_nonfinite_names_the_first_offending_layer(breakage, where):
    net = tiny_net()
    mon = TrainingMonitor(net)
    x = X.clone()
    if breakage == "nan_weight":
        with torch.no_grad():
            net[2].weight[0, 0] = float("nan")
    if breakage == "inf_input":
        x[0, 0] = float("inf")
    out = net(x)
    if breakage == "inf_grad":
        loss = torch.sqrt((out - out.detach()).sum())  # value 0, gradient 1 / (2 * 0)
    elif breakage == "inf_loss":
        loss = torch.log(out.sum() - out.sum().detach())  # log 0
    else:
        loss = out.sum()
    loss.backward()
    with pytest.warns(RuntimeWarning, match="non-finite values at step 0"):
        rec = mon.record(0, loss)
    assert rec.nonfinite.startswith(where)
    assert any(where in finding for finding in mon.diagnose())


def test_chance_level_formulas():
    assert chance_level("softmax", torch.tensor([0, 1, 1]), num_classes=10) == pytest.approx(math.log(10))
    assert chance_level("softmax", torch.tensor([0, 1, 1, 4])) == pytest.approx(math.log(3))
    assert chance_level("prototype", torch.tensor([2, 2, 5, 7])) == pytest.approx(math.log(3))
    # batch [0, 0, 1, 1, 1, 9]: class 0 queries have 1 positive of 5, class 1 queries 2 of 5,
    # the class-9 query has none and is left out.
    got = chance_level("nca", torch.tensor([0, 0, 1, 1, 1, 9]))
    assert got == pytest.approx((2 * math.log(5) + 3 * math.log(5 / 2)) / 5)
    # against separate references (a cache): no self-exclusion
    got = chance_level("nca", [0, 1], ref_labels=[0, 0, 1, 2])
    assert got == pytest.approx((math.log(2) + math.log(4)) / 2)


def test_nca_chance_level_matches_monte_carlo():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 6, (40,), generator=g)
    n, draws = len(labels), 20000
    # Monte-Carlo: each query picks a uniformly random other sample as its neighbour.
    offset = torch.randint(1, n, (n, draws), generator=g)
    neighbour = (torch.arange(n)[:, None] + offset) % n
    hit_rate = (labels[neighbour] == labels[:, None]).double().mean(1)
    valid = hit_rate > 0
    mc = float(-torch.log(hit_rate[valid]).mean())
    assert chance_level("nca", labels) == pytest.approx(mc, rel=0.02)


@pytest.mark.parametrize("kind", ["nca", "prototype", "cache"])
def test_chance_level_is_the_loss_of_uniform_neighbours(kind):
    # A huge temperature makes every neighbour weight equal: the loss is the chance level.
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 5, (30,), generator=g)
    z = torch.randn(30, 8, generator=g)
    if kind == "nca":
        loss, chance = nbkernels.nca_loss(z, labels, temperature=1e6), chance_level("nca", labels)
    elif kind == "prototype":
        loss, chance = nbkernels.prototype_loss(z, labels, temperature=1e6), chance_level("prototype", labels)
    else:
        ref_labels = torch.randint(0, 5, (50,), generator=g)
        loss = nbkernels.nca_loss(z, labels, ref_embeddings=torch.randn(50, 8, generator=g), ref_labels=ref_labels,
                                  temperature=1e6)
        chance = chance_level("nca", labels, ref_labels=ref_labels)
    assert float(loss) == pytest.approx(chance, rel=1e-4)


@pytest.mark.parametrize("args, exc, fragment", [
    (("knn", [0, 1]), ValueError, "kind must be one of"),
    (("nca", [0, 1, 2]), ValueError, "no query has a same-label reference"),
    (("nca", [0.0, 1.0]), TypeError, "labels must have an integer dtype"),
    (("softmax", []), ValueError, "labels must be a non-empty 1-D tensor"),
])
def test_chance_level_rejects_bad_input(args, exc, fragment):
    with pytest.raises(exc, match=fragment):
        chance_level(*args)


def test_check_initial_loss_warns_with_the_likely_cause():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_initial_loss(2.4, math.log(10)).ok
    with pytest.warns(RuntimeWarning, match="far above the chance level.*wrongly encoded data"):
        assert not check_initial_loss(9.0, math.log(10)).ok
    with pytest.warns(RuntimeWarning, match="far below the chance level.*labels leak"):
        assert not check_initial_loss(0.2, math.log(10)).ok
    with pytest.warns(RuntimeWarning, match="non-finite"):
        assert not check_initial_loss(float("nan"), 1.0).ok
    # the monitor runs the check on its first record
    net = tiny_net()
    net(X).sum().backward()
    mon = TrainingMonitor(net, chance=math.log(10))
    with pytest.warns(RuntimeWarning, match="far above"):
        mon.record(0, 30.0)
    assert not mon.chance_check.ok and mon.chance_check.message in mon.diagnose()


def _blobs(n=2000, classes=10, dim=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=g) * 3
    y = torch.randint(0, classes, (n,), generator=g)
    return centers[y] + torch.randn(n, dim, generator=g), y


def _train(x, y, lr, steps=60):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(x.shape[1], 32), nn.ReLU(), nn.Linear(32, 10))
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    mon = TrainingMonitor(net, chance=math.log(10), warn=False)
    g = torch.Generator().manual_seed(2)
    for step in range(steps):
        idx = torch.randint(0, len(y), (64,), generator=g)
        loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        if step % 5 == 0 or step == steps - 1:
            mon.record(step, loss)
        opt.step()
    return mon


def test_broken_setups_are_flagged():
    x, y = _blobs()
    healthy = _train(x, y, lr=1e-2)
    assert healthy.diagnose() == []
    assert healthy.history[-1].train_loss < 0.1
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(1))]
    findings = _train(x, shuffled, lr=1e-2).diagnose()
    assert any("still at the chance level" in f for f in findings), findings
    findings = _train(x, y, lr=1e3).diagnose()
    assert any("learning rate is likely too high" in f for f in findings), findings


def test_overfit_small_batch_passes_and_fails():
    x, y = _blobs(n=32, dim=8)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 10))
    before = [p.clone() for p in net.parameters()]
    result = overfit_small_batch(net, nn.functional.cross_entropy, (x, y), steps=500, lr=1e-2)
    assert result.passed and result.final_loss <= 0.05 < result.initial_loss
    assert result.steps == len(result.losses) - 1 < 500
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))  # trained a copy
    assert "passed" in str(result)
    # a linear model with a tiny learning rate cannot fit: fails after exactly `steps` updates
    result = overfit_small_batch(nn.Linear(8, 10), nn.functional.cross_entropy, (x, y), steps=20, lr=1e-6)
    assert not result.passed and result.steps == 20 and "FAILED" in str(result)
    with pytest.raises(ValueError, match="no trainable parameter"):
        overfit_small_batch(nn.Linear(8, 10).requires_grad_(False), nn.functional.cross_entropy, (x, y))
    # the nca loss on an embedding network, as the demo uses it
    emb = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 16))
    xb = torch.cat([x, x + 0.01])
    yb = torch.cat([y, y])
    assert overfit_small_batch(emb, nbkernels.nca_loss, (xb, yb), steps=300, lr=1e-2).passed
    with pytest.raises(ValueError, match="steps must be an int >= 1, got 0"):
        overfit_small_batch(net, nn.functional.cross_entropy, (x, y), steps=0)
    with pytest.raises(ValueError, match="batch must be an"):
        overfit_small_batch(net, nn.functional.cross_entropy, x)


def test_plots(tmp_path):
    net = tiny_net()
    mon = TrainingMonitor(net, chance=3.0, warn=False)
    for step in range(3):
        net(X).sum().backward()
        mon.record(step, 3.0 - step, test_loss=3.5 - step)
    fig = plot_grad_norms(mon, path=tmp_path / "bars.png")
    assert len(fig.axes[0].patches) == 2  # one bar per layer with parameters
    assert (tmp_path / "bars.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fig = plot_history({"a": mon, "b": mon}, path=tmp_path / "hist.png")
    assert len(fig.axes) == 6 and (tmp_path / "hist.png").stat().st_size > 0
    assert fig.axes[0].get_ylabel() == "" and fig.axes[0].get_title() == "train loss / chance level"
    with pytest.raises(ValueError, match="no records"):
        plot_grad_norms(TrainingMonitor(tiny_net()))
    with pytest.raises(ValueError, match="name must be a StepRecord field"):
        mon.series("bogus")


# ------------------------------------------------------------ record: loss arguments


@pytest.mark.parametrize("loss,want", [
    (2.5, 2.5), (3, 3.0), (torch.tensor(2.5), 2.5), (torch.tensor([2.5]), 2.5),
    (torch.tensor([[2.5]]), 2.5), (torch.tensor(2.5, dtype=torch.float16), 2.5),
    (np.float32(2.5), 2.5), (np.array([2.5]), 2.5),
])
def test_record_accepts_a_number_or_one_element_tensor(loss, want):
    with TrainingMonitor(tiny_net()) as mon:
        rec = mon.record(0, loss, test_loss=loss)
    assert rec.train_loss == want and rec.test_loss == want


@pytest.mark.parametrize("name", ["train_loss", "test_loss"])
@pytest.mark.parametrize("loss,exc,fragment", [
    (torch.tensor([1.0, 2.0]), ValueError, r"got a tensor of shape \(2,\) \(2 values\)"),
    (torch.zeros(0), ValueError, r"got a tensor of shape \(0,\) \(0 values\)"),
    (np.zeros((2, 2)), ValueError, r"got a tensor of shape \(2, 2\) \(4 values\)"),
    ("1.0", TypeError, "got str '1.0'"),
    (True, TypeError, "got a torch.bool tensor"),
    ([1.0], TypeError, "got list"),
])
def test_record_rejects_bad_losses_naming_them(name, loss, exc, fragment):
    net = tiny_net()
    with TrainingMonitor(net) as mon:
        kw = {name: loss, "train_loss": loss if name == "train_loss" else 1.0}
        with pytest.raises(exc, match=rf"{name} must be a Python number or a tensor holding one "
                           rf"value \(shape \(\), \(1,\) or any other shape with one element\), "
                           rf".*{fragment}"):
            mon.record(0, **kw)
    assert mon.history == []


def test_record_rejects_a_missing_train_loss():
    with TrainingMonitor(tiny_net()) as mon:
        with pytest.raises(TypeError, match="train_loss must be a Python number .*got NoneType None"):
            mon.record(0, None)
        assert mon.record(1, 1.0, test_loss=None).test_loss is None


# ------------------------------------------------------------ lifetime: hooks


def _hook_count(net):
    return sum(len(m._forward_hooks) for m in net.modules())


def test_unclosed_monitor_is_collected_and_removes_its_hooks():
    net = tiny_net()
    mon = TrainingMonitor(net)
    assert _hook_count(net) == 3
    net(X).sum().backward()
    mon.record(0, 1.0)
    ref = weakref.ref(mon)
    del mon
    gc.collect()
    assert ref() is None
    assert _hook_count(net) == 0
    assert all(not m._forward_hooks for m in net.modules())
    net(X).sum().backward()  # the model runs on without the monitor


def test_monitor_hooks_do_not_keep_it_alive_and_close_is_idempotent():
    net = tiny_net()
    mon = TrainingMonitor(net)
    # the hooks on the model hold no strong reference to the monitor
    hooks = [h for m in net.modules() for h in m._forward_hooks.values()]
    assert hooks and all(cell.cell_contents is not mon for h in hooks for cell in h.__closure__ or ())
    second = TrainingMonitor(net)
    mon.close()
    mon.close()
    assert _hook_count(net) == 3  # the second monitor's hooks stay
    net(X).sum().backward()
    assert second.record(0, 1.0).dead_relu == pytest.approx(1 / 3)
    with second:
        pass
    assert _hook_count(net) == 0
    assert len(second.history) == 1  # the history stays readable after close
