"""The one model of a sparse run: the mean of its replicas' parameters.

Replicas under sparse averaging hold different weights. At every evaluation point the
run also evaluates their mean (one dense all-reduce of a copy, after which each replica
continues untouched), and at the end of training (``--dp-final-average``, on by default)
the replicas are averaged once, so the last checkpoint and every export hold one model.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
import torch.distributed as dist


def _mean(params: Sequence[torch.Tensor], group) -> torch.Tensor:
    """The replicas' mean of ``params``, concatenated, in fp32 (one all-reduce)."""
    flat = torch.cat([p.detach().float().reshape(-1) for p in params])
    dist.all_reduce(flat, group=group)
    return flat.div_(dist.get_world_size(group=group))


def write_flat(params: Sequence[torch.Tensor], flat: torch.Tensor) -> None:
    """Copy consecutive slices of ``flat`` into ``params`` (in their dtype)."""
    offset = 0
    with torch.no_grad():
        for p in params:
            n = p.numel()
            p.copy_(flat[offset:offset + n].view_as(p))
            offset += n


@contextlib.contextmanager
def consensus(params: Sequence[torch.Tensor], group) -> Iterator[int]:
    """Within the block ``params`` hold the replicas' mean; afterwards their own values
    again. Yields the bytes this rank handed to the all-reduce."""
    saved = [p.detach().clone() for p in params]
    flat = _mean(params, group)
    write_flat(params, flat)
    try:
        yield flat.numel() * flat.element_size()
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)


def average_replicas(params: Sequence[torch.Tensor], group, after=None) -> int:
    """Replace every replica's ``params`` by their mean, for good: the parameters the
    optimizer updates (a mixed-precision optimizer's fp32 main parameters, then
    ``after()`` copies them into the model). Returns the bytes sent."""
    flat = _mean(params, group)
    write_flat(params, flat)
    if after is not None:
        after()
    return flat.numel() * flat.element_size()
