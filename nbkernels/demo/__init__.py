"""``python -m nbkernels.demo``: the softmax-vs-neighbors experiment in one command.

The same small embedding network is trained with softmax cross-entropy, ``nca_loss``,
``prototype_loss``, a ``NeighborCache`` as the only signal, and softmax + cache, under
identical budgets and seeds, on scikit-learn's bundled digits (or ``--data file.npz``).
The test-set representations are compared (soft-kNN / 5-NN accuracy, silhouette,
intra/inter distance ratio, time) and training health is monitored with
``nbkernels.diagnostics``. Outputs: report.md, metrics.json, tsne.png, training.png.

Modules: ``data`` (loading, split), ``train`` (model, objectives, loop), ``evaluate``
(metrics), ``report`` (files and plots), ``run`` (orchestration), ``cli`` (options).
Needs scikit-learn, matplotlib and tqdm.

Example::

    python -m nbkernels.demo --quick --out /tmp/demo
"""
from nbkernels.demo.cli import main

__all__ = ["main"]
