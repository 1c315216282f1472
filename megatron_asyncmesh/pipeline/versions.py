"""Weight versions of one pipeline stage (PipeDream-2BW double buffering and
PipeDream weight stashing), swapped under the model without touching Megatron.

The optimizer only ever updates the *live* storage of each parameter (what
Megatron allocated: a view into DDP's buffer or a plain tensor), so Megatron's
optimizers, DDP and checkpointing keep working unchanged. When the schedule
needs older weights to stay valid across an optimizer step
(``schedule.needs_snapshot``), each new version is copied once into its own
buffer right after the step that produced it, and forwards/backwards run with
``param.data`` pointing at that buffer. One copy of the stage's weights per
optimizer step is the whole cost; buffers are recycled as soon as no
in-flight or future microbatch uses their version, so ``2bw`` holds 2 and
``stash`` at most P - k versions at stage k.

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
    def __init__(self, params: Sequence[torch.nn.Parameter], enabled: bool):
        self.params = list(params)
        self.live = [p.data for p in self.params]
        self.enabled = enabled
        self.snapshots: Dict[int, List[torch.Tensor]] = {}
        self.free: List[List[torch.Tensor]] = []
        self.refs: Dict[int, int] = defaultdict(int)
        self.current = None          # version params point at; None = live
        self.peak_versions = 0
        self.copies = 0
        self._ids = {id(p) for p in self.params}

    # -- versions ------------------------------------------------------------
    def on_version(self, version: int, next_forward_version: int) -> None:
        """Called with the live weights = ``version`` (after its optimizer step):
        drop versions nobody will use again, then snapshot the new one."""
        self.point_to_live()
        if not self.enabled:
            return
        for v in sorted(self.snapshots):
            if v < next_forward_version and self.refs.get(v, 0) == 0 and v != version:
                self.free.append(self.snapshots.pop(v))
        if version not in self.snapshots:
            buf = self.free.pop() if self.free else [torch.empty_like(t) for t in self.live]
            with torch.no_grad():
                for dst, src in zip(buf, self.live):
                    dst.copy_(src)
            self.snapshots[version] = buf
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
        return {"enabled": self.enabled, "versions": sorted(self.snapshots),
                "peak_versions": self.peak_versions, "copies": self.copies}
