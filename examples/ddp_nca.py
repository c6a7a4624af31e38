"""DDP training with the exact global-batch NCA loss and a sharded cache.

Run on CPU (Gloo), two processes on this machine:

    torchrun --nproc_per_node=2 examples/ddp_nca.py

(on GPUs: the same with --backend nccl; each rank then uses cuda:LOCAL_RANK).

Each rank embeds its own local batch (sizes may differ). ``nca_loss(..., distributed=True)``
scores the local rows against the batch gathered from every rank, with gradient, and
returns the loss of the global batch: the same value on every rank. Its gradient w.r.t.
the local rows is world_size times the single-process one, so DDP's averaging yields
exactly the parameter gradients of single-process training on the concatenated batch.
After the first step, rank 0 checks that claim against a single-process computation.
"""
import argparse
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import nbkernels


def make_model():
    torch.manual_seed(0)  # the same initial weights on every rank (DDP also broadcasts them)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16))


def local_batch(step, rank, world):
    """Rank ``rank``'s share of the global batch of ``step``: 48 + 8 * rank rows."""
    g = torch.Generator().manual_seed(step)
    sizes = [48 + 8 * r for r in range(world)]
    x = torch.randn(sum(sizes), 32, generator=g)
    y = torch.randint(0, 10, (sum(sizes),), generator=g)
    x = x + 0.5 * nn.functional.one_hot(y, 32).float()  # some class signal
    lo = sum(sizes[:rank])
    return x[lo:lo + sizes[rank]], y[lo:lo + sizes[rank]], x, y


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    dist.init_process_group(args.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cpu")
    if args.backend == "nccl":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)

    model = DDP(make_model().to(device), device_ids=[device.index] if device.index is not None
                else None)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    # every rank keeps 256 slots of its own; the loss sees the union of all ranks' slots
    cache = nbkernels.NeighborCache(256, 16, 10, temperature=0.1, distributed=True,
                                    device=device)
    for step in range(args.steps):
        x, y, x_all, y_all = local_batch(step, rank, world)
        x, y = x.to(device), y.to(device)
        emb = model(x)
        loss = nbkernels.nca_loss(emb, y, temperature=0.5, distributed=True)
        total = loss + 0.1 * cache(emb, y)  # cache: local queries vs the union, then push
        opt.zero_grad()
        total.backward()
        if step == 0:  # the cache is still empty: its term is 0 and adds no gradient
            check_against_single_process(model.module, loss, x_all, y_all, rank)
        opt.step()
        if rank == 0 and step % 5 == 0:
            print(f"step {step:3d}  global NCA loss {loss.item():.4f}  total {total.item():.4f}")
    dist.destroy_process_group()


def check_against_single_process(module, loss, x_all, y_all, rank):
    """The DDP-averaged gradients equal those of one process on the concatenated batch."""
    if rank != 0:
        return
    single = make_model()
    single.load_state_dict({k: v.cpu() for k, v in module.state_dict().items()})
    want = nbkernels.nca_loss(single(x_all), y_all, temperature=0.5)
    want.backward()
    torch.testing.assert_close(loss.detach().cpu(), want.detach(), rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(module.named_parameters(), single.parameters()):
        torch.testing.assert_close(p.grad.cpu(), q.grad, rtol=1e-4, atol=1e-6,
                                   msg=lambda m, name=name: f"{name}: {m}")
    print(f"check: loss {loss.item():.6f} and every parameter gradient equal single-process "
          f"training on the concatenated batch")


if __name__ == "__main__":
    main()
