"""Per-rank pipeline timeline: busy intervals per action, utilization.

Forward and backward intervals are recorded by wrapping Megatron's
``schedules.forward_step`` / ``schedules.backward_step`` (module globals that
both Megatron's own 1F1B and this project's executor call), so the
synchronous baseline is measured on Megatron's own schedule, not on a
re-implementation. The executor adds its P2P waits (COMM) and the training
loop the optimizer step (STEP) and the span of every step.
"""

from __future__ import annotations

import json
import os
import time
from typing import List, Optional

from megatron_asyncmesh import patching

TIMING_PATCH = patching.declare(
    "timeline-compute", package="megatron-core",
    target="`megatron.core.pipeline_parallel.schedules.forward_step` and `.backward_step` "
           "(module globals)",
    replacement="the same functions, timed (an interval per call on the rank's timeline)",
    why="measurement only: both Megatron's own 1F1B and the executor call them, so the "
        "synchronous baseline is timed on Megatron's own schedule",
    when="during a training run (`Timeline.install()` .. `uninstall()`)")


class Timeline:
    def __init__(self, stage: int, rank: int):
        self.stage, self.rank = stage, rank
        self.intervals: List[dict] = []
        self.steps: List[dict] = []   # {"step", "start", "end", "steady"}
        self._saved = None

    def add(self, kind: str, start: float, end: float, microbatch: int = -1) -> None:
        self.intervals.append({"stage": self.stage, "kind": kind, "start": start, "end": end,
                               "microbatch": microbatch})

    def add_step(self, step: int, start: float, end: float, steady: bool) -> None:
        self.steps.append({"step": step, "start": start, "end": end, "steady": steady})

    # -- recording Megatron's compute ------------------------------------------------
    def install(self) -> "Timeline":
        from megatron.core.pipeline_parallel import schedules

        fwd, bwd = schedules.forward_step, schedules.backward_step
        self._saved = (fwd, bwd)
        timeline = self

        def forward_step(*args, **kwargs):
            t0 = time.time()
            out = fwd(*args, **kwargs)
            timeline.add("F", t0, time.time(), kwargs.get("current_microbatch", -1))
            return out

        def backward_step(*args, **kwargs):
            t0 = time.time()
            out = bwd(*args, **kwargs)
            timeline.add("B", t0, time.time())
            return out

        patching.replace(schedules, "forward_step", forward_step, patch=TIMING_PATCH)
        patching.replace(schedules, "backward_step", backward_step, patch=TIMING_PATCH)
        return self

    def uninstall(self) -> None:
        if self._saved is None:
            return
        from megatron.core.pipeline_parallel import schedules

        patching.restore(schedules, "backward_step", self._saved[1], patch=TIMING_PATCH)
        patching.restore(schedules, "forward_step", self._saved[0], patch=TIMING_PATCH)
        self._saved = None

    def discard_before(self, t: float) -> None:
        """Forget intervals of evaluation etc. that are not training steps."""
        self.intervals = [iv for iv in self.intervals if iv["end"] > t]

    # -- analysis ------------------------------------------------------------------
    def busy_between(self, t0: float, t1: float) -> float:
        return sum(max(0.0, min(iv["end"], t1) - max(iv["start"], t0))
                   for iv in self.intervals if iv["kind"] in ("F", "B", "STEP"))

    def steady_utilization(self) -> Optional[float]:
        """Busy (forward, backward, optimizer step) fraction of the wall time of
        the steady steps: not the first of the run (one-off set-up), not the
        first or last of a pipeline segment (warm-up, drain)."""
        spans = [(s["start"], s["end"]) for s in self.steps if s["steady"]]
        total = sum(b - a for a, b in spans)
        if total <= 0:
            return None
        return sum(self.busy_between(a, b) for a, b in spans) / total

    def window(self, first_step: int, last_step: int) -> List[dict]:
        """Intervals inside the span of steps first_step..last_step (for plots)."""
        spans = [s for s in self.steps if first_step <= s["step"] <= last_step]
        if not spans:
            return []
        t0, t1 = spans[0]["start"], spans[-1]["end"]
        return [iv for iv in self.intervals if iv["start"] >= t0 and iv["end"] <= t1]

    def save(self, path: str, extra: Optional[dict] = None) -> None:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"stage": self.stage, "rank": self.rank, "intervals": self.intervals,
                       "steps": self.steps, **(extra or {})}, f)
        os.replace(tmp, path)
