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

The data are generated: every class is a Gaussian blob around its own centre (fixed
centres, fresh samples each step). Rank 0 prints the soft-kNN accuracy of a held-out set
(references: a fixed training set) before and after training.
"""
import argparse
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import nbkernels


NUM_CLASSES, IN_DIM = 10, 32
# Class centres, fixed for the whole run (the same on every rank). Their spread sets how
# separable the classes are: about 0.7 soft-kNN accuracy on the raw inputs, so that
# there is something to learn but also room to improve.
CENTRES = 0.6 * torch.randn(NUM_CLASSES, IN_DIM, generator=torch.Generator().manual_seed(1234))


def make_model():
    torch.manual_seed(0)  # the same initial weights on every rank (DDP also broadcasts them)
    return nn.Sequential(nn.Linear(IN_DIM, 64), nn.ReLU(), nn.Linear(64, 16))


def sample(n, seed):
    """``n`` labelled points: label uniform in 0..9, x = its class centre + N(0, I)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    return CENTRES[y] + torch.randn(n, IN_DIM, generator=g), y


def local_batch(step, rank, world):
    """Rank ``rank``'s share of the global batch of ``step``: 48 + 8 * rank rows."""
    sizes = [48 + 8 * r for r in range(world)]
    x, y = sample(sum(sizes), seed=step)
    lo = sum(sizes[:rank])
    return x[lo:lo + sizes[rank]], y[lo:lo + sizes[rank]], x, y


@torch.no_grad()
def knn_accuracy(embed, refs, queries, temperature):
    """Soft-kNN accuracy of ``queries`` against ``refs`` in the embedding ``embed``."""
    (rx, ry), (qx, qy) = refs, queries
    probs = nbkernels.soft_knn_predict(embed(qx), embed(rx), ry, NUM_CLASSES, temperature=temperature)
    return (probs.argmax(1) == qy).double().mean().item()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    parser.add_argument("--steps", type=int, default=200, help="training steps (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=0.5,
                        help="NCA temperature, squared Euclidean distances (default: %(default)s)")
    parser.add_argument("--eval-size", type=int, default=1000,
                        help="held-out points for the soft-kNN accuracy (default: %(default)s)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny model, one process per core
    dist.init_process_group(args.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cpu")
    if args.backend == "nccl":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)

    model = DDP(make_model().to(device), device_ids=[device.index] if device.index is not None
                else None)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    refs, held_out = sample(2000, seed=10**6), sample(args.eval_size, seed=10**6 + 1)
    if rank == 0:
        acc_before = knn_accuracy(model.module, refs, held_out, args.temperature)
        acc_raw = knn_accuracy(nn.Identity(), refs, held_out, args.temperature)
    # every rank keeps 256 slots of its own; the loss sees the union of all ranks' slots
    cache = nbkernels.NeighborCache(256, 16, 10, temperature=0.1, distributed=True,
                                    device=device)
    first = None
    for step in range(args.steps):
        x, y, x_all, y_all = local_batch(step, rank, world)
        x, y = x.to(device), y.to(device)
        emb = model(x)
        loss = nbkernels.nca_loss(emb, y, temperature=args.temperature, distributed=True)
        total = loss + 0.1 * cache(emb, y)  # cache: local queries vs the union, then push
        opt.zero_grad()
        total.backward()
        if step == 0:  # the cache is still empty: its term is 0 and adds no gradient
            check_against_single_process(model.module, loss, x_all, y_all, rank, args.temperature)
        opt.step()
        first = loss.item() if first is None else first
        if rank == 0 and (step % max(1, args.steps // 10) == 0 or step == args.steps - 1):
            print(f"step {step:3d}  global NCA loss {loss.item():.4f}  total {total.item():.4f}")
    if rank == 0:
        acc_after = knn_accuracy(model.module, refs, held_out, args.temperature)
        print(f"global NCA loss: {first:.4f} -> {loss.item():.4f} (first step -> last step)")
        print(f"soft-kNN accuracy on {args.eval_size} held-out points: {acc_before:.3f} -> {acc_after:.3f} "
              f"(raw inputs {acc_raw:.3f}, chance {1 / NUM_CLASSES:.3f})")
    dist.destroy_process_group()
    if args.backend == "gloo":
        # torch 2.13 on Gloo: a worker thread may still hold the last collective's tensors
        # when the interpreter shuts down; it then takes the GIL too late and the process
        # aborts (SIGABRT) after its work is done (pytorch/pytorch#190489). Leaving
        # without the interpreter's shutdown avoids it.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def check_against_single_process(module, loss, x_all, y_all, rank, temperature):
    """The DDP-averaged gradients equal those of one process on the concatenated batch."""
    if rank != 0:
        return
    single = make_model()
    single.load_state_dict({k: v.cpu() for k, v in module.state_dict().items()})
    want = nbkernels.nca_loss(single(x_all), y_all, temperature=temperature)
    want.backward()
    torch.testing.assert_close(loss.detach().cpu(), want.detach(), rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(module.named_parameters(), single.parameters()):
        torch.testing.assert_close(p.grad.cpu(), q.grad, rtol=1e-4, atol=1e-6,
                                   msg=lambda m, name=name: f"{name}: {m}")
    print(f"check: loss {loss.item():.6f} and every parameter gradient equal single-process "
          f"training on the concatenated batch")


if __name__ == "__main__":
    main()
