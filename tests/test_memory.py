"""Training steps must not leak: 1000 forward+backward steps keep memory flat."""
import gc

import torch

import nbkernels


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_thousand_training_steps_keep_memory_flat():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    cache = nbkernels.NeighborCache(256, 8, 5)
    crit = nbkernels.NCALoss(temperature=0.5, learn_temperature=True)
    opt.add_param_group({"params": crit.parameters()})
    x = torch.randn(48, 16)
    y = torch.arange(48) % 5

    def step():
        opt.zero_grad(set_to_none=True)
        emb = net(x)
        loss = (crit(emb, y) + nbkernels.prototype_loss(emb, y, backend="torch") + cache(emb, y)
                + nbkernels.soft_knn_predict(emb, emb, y, 5, exclude_self=True).sum() * 0)
        loss.backward()
        opt.step()
        return loss.detach()

    for _ in range(200):
        step()
    gc.collect()
    before = _rss_bytes()
    for _ in range(1000):
        last = step()
    gc.collect()
    growth = _rss_bytes() - before
    assert torch.isfinite(last)
    assert growth < 8 * 2**20, f"resident memory grew by {growth / 2**20:.1f} MiB over 1000 steps"


def test_cpu_launch_copies_no_input_without_rows_at_infinity():
    """The fused torch backend's working set on the CPU (bench/results/cpu_compare.json
    measures it): without a point at infinity ``finite_rows`` hands the rows back as they
    are, unflagged, and the batch against itself keeps one sorted copy for both sides,
    unscaled."""
    from nbkernels.backends.infinity import finite_rows
    from nbkernels.backends.torch_blocked import _Problem
    q, r = torch.randn(7, 3), torch.randn(5, 3)
    a, b, a_far, b_far = finite_rows(q, q, "sqeuclidean")
    assert a is q and b is q and a_far is None and b_far is None
    got = finite_rows(q, r, "sqeuclidean")
    assert got[0] is q and got[1] is r and got[2:] == (None, None)
    far = r.clone()
    far[2, 1] = float("inf")
    q2, r2, q_far, r_far = finite_rows(q, far, "sqeuclidean")
    assert q2 is q and q_far is None and r_far.tolist() == [False, False, True, False, False]
    assert torch.equal(r2[2], torch.zeros(3)) and torch.equal(r2[[0, 1, 3, 4]], far[[0, 1, 3, 4]])
    labels, t = torch.tensor([2, 0, 1, 0, 2, 1, 0]), torch.tensor(0.5)
    pb = _Problem(q, q, labels, labels, t, "sqeuclidean", 0)
    assert pb.r is pb.q and pb.rl is pb.ql and pb.r_order is pb.q_order
    # the logit scale rides on the products (alpha), not on a scaled copy of the queries
    assert pb.q_scaled is pb.q and pb.alpha == float(2 / t)
    other = _Problem(q, q.clone(), labels, labels, t, "sqeuclidean", 0)
    assert other.r is not other.q and torch.equal(other.r, pb.r)
