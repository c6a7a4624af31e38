"""nbkernels: fused kernels for neighbor-based losses in deep metric learning.

Soft-kNN / NCA, prototype and cache losses computed FlashAttention style: distances,
temperature softmax and label aggregation in one pass, never holding the N x M matrix.
"""
from nbkernels import autograd, distributed, partials
from nbkernels._validation import BackendUnavailableError
from nbkernels.cache import NeighborCache
from nbkernels.functional import nca_loss, prototype_loss, soft_knn_predict
from nbkernels.modules import NCALoss, PrototypeLoss
from nbkernels.sampler import ClassBalancedBatchSampler
from nbkernels.warmup import warmup

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "ClassBalancedBatchSampler",
    "NCALoss",
    "NeighborCache",
    "PrototypeLoss",
    "autograd",
    "distributed",
    "partials",
    "nca_loss",
    "prototype_loss",
    "soft_knn_predict",
    "warmup",
]
