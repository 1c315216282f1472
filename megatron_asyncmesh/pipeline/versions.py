"""Weight versions of one pipeline stage (PipeDream-2BW double buffering and
PipeDream weight stashing), swapped under the model without touching Megatron.

The optimizer only ever updates the *live* storage of each parameter, so
Megatron's optimizers, DDP and checkpointing keep working unchanged. When the
schedule needs older weights to stay valid across an optimizer step
(``schedule.needs_snapshot``), the live version is kept once per optimizer step:

- ``swap`` (every optimizer but Megatron's flat distributed optimizer): forwards
  on the live version run on the live storage. Right before the optimizer step,
  if an in-flight or future microbatch still needs that version, the live storage
  is *retired* as its snapshot and a recycled buffer (holding the same values)
  becomes the live storage the optimizer updates. The stage holds the live
  weights and the versions still in use: ``2bw`` two copies in all, as
  PipeDream-2BW prescribes.
- ``copy`` (``--use-distributed-optimizer``, whose parameters are views into
  DDP's flat buffer that the optimizer writes): each new version is copied into
  its own buffer when its call starts and forwards run on that copy, one copy
  more (``2bw``: three).

Either way one copy of the stage's weights per optimizer step is the cost, and
buffers are recycled as soon as no in-flight or future microbatch uses their
version.

Autograd saves the weights a forward used (leaf parameters or views of their
storage). The optimizer's in-place update of the live storage bumps the
parameter's version counter, which would make autograd refuse the delayed
backward. ``saved_tensors_hooks`` (``stash_hooks``) save a detached alias of
the parameter storage the forward actually read instead, so the backward of
microbatch j uses exactly the weights of its forward, by construction.
"""

from __future__ import annotations

import contextlib
import logging
from collections import defaultdict
from typing import Dict, List, Sequence

import torch

log = logging.getLogger(__name__)


class WeightVersionStore:
    def __init__(self, params: Sequence[torch.nn.Parameter], enabled: bool, swap: bool = True):
        self.params = list(params)
        self.live = [p.data for p in self.params]
        self.enabled = enabled
        self.swap = swap
        self.live_version = None     # the version the live storage holds (swap)
        self.snapshots: Dict[int, List[torch.Tensor]] = {}
        self.free: List[List[torch.Tensor]] = []
        self.refs: Dict[int, int] = defaultdict(int)
        self.current = None          # version params point at; None = live
        self.peak_versions = 0
        self.copies = 0
        self._ids = {id(p) for p in self.params}

    # -- versions ------------------------------------------------------------
    def on_version(self, version: int, next_forward_version: int) -> None:
        """Called when a step's call starts, with the live weights = ``version``:
        drop versions nobody will use again; ``copy`` mode also snapshots the new one
        (``swap`` keeps it on the live storage until :meth:`retire_live`)."""
        self.point_to_live()
        if not self.enabled:
            return
        self.live_version = version
        self._drop_unused(next_forward_version, keep=version)
        if not self.swap and version not in self.snapshots:
            buf = self.free.pop() if self.free else [torch.empty_like(t) for t in self.live]
            with torch.no_grad():
                for dst, src in zip(buf, self.live):
                    dst.copy_(src)
            self.snapshots[version] = buf
            self.copies += 1
        self.peak_versions = max(self.peak_versions, len(self.snapshots))

    def _drop_unused(self, next_forward_version: int, keep=None) -> None:
        for v in sorted(self.snapshots):
            if v < next_forward_version and self.refs.get(v, 0) == 0 and v != keep:
                self.free.append(self.snapshots.pop(v))

    def retire_live(self, next_forward_version: int) -> None:
        """Right before the optimizer step (``swap``): if an in-flight microbatch ran on
        the live version, or a future one will, the live storage becomes that version's
        snapshot (the saved tensors of those forwards alias it) and a recycled buffer
        with the same values becomes the live storage the optimizer updates."""
        if not (self.enabled and self.swap):
            return
        self.point_to_live()
        version = self.live_version
        self._drop_unused(next_forward_version)
        if version is None or version in self.snapshots or not (
                self.refs.get(version, 0) > 0 or next_forward_version <= version):
            return
        buf = self.free.pop() if self.free else [torch.empty_like(t) for t in self.live]
        with torch.no_grad():
            for dst, src in zip(buf, self.live):
                dst.copy_(src)
        self.snapshots[version] = self.live
        self.live = buf
        for p, t in zip(self.params, self.live):
            p.data = t
        self.copies += 1
        self.peak_versions = max(self.peak_versions, len(self.snapshots))

    def restore(self, version: int, tensors: Sequence[torch.Tensor]) -> None:
        """A version loaded from a checkpoint (resuming a no-flush run)."""
        if not self.enabled:
            return
        if len(tensors) != len(self.live) or any(
                t.shape != l.shape for t, l in zip(tensors, self.live)):
            raise ValueError(f"weight version {version} from the checkpoint does not match "
                             f"this stage's parameters.")
        self.snapshots[version] = [t.to(l.device, l.dtype).clone()
                                   for t, l in zip(tensors, self.live)]

    def has(self, version: int) -> bool:
        return not self.enabled or version in self.snapshots

    def point_to(self, version: int) -> None:
        if not self.enabled or self.current == version:
            return
        if self.swap and version == self.live_version and version not in self.snapshots:
            self.point_to_live()
            return
        if version not in self.snapshots:
            raise RuntimeError(
                f"weight version {version} is not stored (have {sorted(self.snapshots)}); "
                "the schedule asked for a version it never produced or already freed.")
        for p, t in zip(self.params, self.snapshots[version]):
            p.data = t
        self.current = version

    def point_to_live(self) -> None:
        if self.current is None:
            return
        for p, t in zip(self.params, self.live):
            p.data = t
        self.current = None

    def acquire(self, version: int) -> None:
        self.refs[version] += 1

    def release(self, version: int) -> None:
        self.refs[version] -= 1

    # -- autograd --------------------------------------------------------------
    def stash_hooks(self):
        """Context for forwards: parameters saved for backward are saved as an
        alias of the storage they had during this forward (see module doc)."""
        if not self.enabled:
            return contextlib.nullcontext()
        ids = self._ids

        def pack(t):
            return t.detach() if id(t) in ids else t

        return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)

    def state(self) -> dict:
        return {"enabled": self.enabled, "mode": "swap" if self.swap else "copy",
                "versions": sorted(self.snapshots), "peak_versions": self.peak_versions,
                # The live weights plus the stored versions, at the peak.
                "peak_weight_copies": 1 + self.peak_versions, "copies": self.copies}
