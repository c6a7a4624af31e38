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
