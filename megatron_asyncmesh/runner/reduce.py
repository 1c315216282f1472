"""Per-step metrics and evaluation losses reduced over the world, for both engines and
the run loop: one all-reduce per call, in float64."""

from __future__ import annotations

import math
from typing import List

import torch
import torch.distributed as dist


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def world_mean_loss(loss_sum: float, tokens: float) -> float:
    """Token-weighted mean loss over every rank's ``(sum of token losses, token count)``
    (one all-reduce over the world: a synchronisation point, used for evaluation)."""
    total = torch.tensor([loss_sum, tokens], dtype=torch.float64, device=_device())
    dist.all_reduce(total)
    s, n = total.tolist()
    return s / max(n, 1.0)


def reduce_records(records: List[dict], norm_replicas: int) -> List[dict]:
    """Global loss and gradient norm of several steps with ONE all-reduce.

    Asynchronous stages finish a step at different wall times, so per-step metrics are
    kept locally and reduced together only where the pipeline is drained anyway
    (evaluation, checkpoint, end) or, for synchronous runs, at the logging interval.
    ``grad_norm_sq`` is this rank's squared norm (None: the engine reports none); ranks
    holding the same norm are divided out by ``norm_replicas``.
    """
    packed = torch.tensor([[r["loss_sum"], r["tokens"], r["grad_norm_sq"] or 0.0]
                           for r in records], dtype=torch.float64, device=_device()).view(-1, 3)
    dist.all_reduce(packed)
    out = []
    for rec, (loss_sum, tokens, norm_sq) in zip(records, packed.tolist()):
        out.append({**rec, "loss": loss_sum / max(tokens, 1.0),
                    "grad_norm": (None if rec["grad_norm_sq"] is None
                                  else math.sqrt(max(norm_sq, 0.0) / norm_replicas))})
    return out
