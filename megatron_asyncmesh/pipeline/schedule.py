"""Pipeline schedules as data: each stage's ordered list of actions.

A schedule is a pure function of (pipeline size P, stage k, microbatches per
optimizer step M, mode). Nothing here touches a process group, so every
(P, M, mode) can be validated and simulated in one process (``simulate.py``)
and the executor (``executor.py``) only executes what this module decided.

Actions (``str(action)`` in brackets, as in torch.distributed.pipelining)::

    F   forward of microbatch j            [F12]
    B   backward of microbatch j           [B12]
    W   point the stage's weights at version v before an F or B   [W3]
    STEP  the stage's optimizer step t (produces version t + 1)   [S3]
    COMM  one blocking P2P call: a set of sends/receives posted together and
          waited on together, exactly Megatron's ``P2PCommunicator`` calls
          (``send_forward_recv_backward`` is {send F j -> k+1, recv B i <- k+1})
                                                             [C(sf12,rb9)]

Modes (shared/ALGORITHMS.md section 1). Microbatch ids are global (0-based
over the whole run); the version of stage k's weights used by the forward
AND the backward of microbatch j is structural, fixed by (mode, P, k, M, j):

- ``flush``: Megatron's 1F1B; warm-up, steady 1F1B and cool-down inside every
  optimizer step; version floor(j / M).
- ``2bw`` (PipeDream-2BW): no flush; version max(floor(j / M) - 1, 0), so
  W(t+1) = W(t) - lr * U(g(W(t-1))): delay exactly 1 at every stage. Needs
  M >= P (at stage 0 the forward of the first microbatch of step t runs
  P - 1 backwards ahead; version t - 1 must exist by then).
- ``stash`` (PipeDream weight stashing): no flush; the forward runs on the
  newest weights and the same version is stashed for its backward. In the
  continuous 1F1B stream stage k has done floor((j - w_k) / M) steps when
  it runs F(j), w_k = P - 1 - k, so version max(floor((j - w_k) / M), 0);
  with M = 1 the delay is P - 1 - k (stage 0 is the stalest).

No-flush modes warm up once per segment (a segment = the optimizer steps
between two drains: start of training, evaluation, checkpoint, end). Because
versions are structural, where the drains fall does not change the training
trajectory, only the time spent in warm-up and cool-down.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

MODES = ("flush", "2bw", "stash")
ASYNC_MODES = ("2bw", "stash")

# COMM op codes: (op, microbatch). sf/rf = send/recv forward activation,
# sb/rb = send/recv backward gradient. Send-forward goes to stage k+1,
# send-backward to stage k-1.
SEND_F, RECV_F, SEND_B, RECV_B = "sf", "rf", "sb", "rb"


class ScheduleError(ValueError):
    """A (P, M, mode) combination the schedule cannot run, with the fix."""


@dataclass(frozen=True)
class Action:
    kind: str                      # "F", "B", "W", "STEP", "COMM"
    microbatch: int = -1
    step: int = -1                 # optimizer step the microbatch belongs to (STEP: its index)
    version: int = -1              # weight version (F, B, W)
    ops: Tuple[Tuple[str, int], ...] = ()   # COMM only

    def __str__(self) -> str:
        if self.kind in ("F", "B"):
            return f"{self.kind}{self.microbatch}"
        if self.kind == "W":
            return f"W{self.version}"
        if self.kind == "STEP":
            return f"S{self.step}"
        return "C(" + ",".join(f"{op}{mb}" for op, mb in self.ops) + ")"

    __repr__ = __str__


def warmup_microbatches(mode: str, P: int, stage: int, M: int) -> int:
    """Forwards a stage runs ahead of its first backward (Megatron's formula)."""
    if mode == "flush":
        return min(P - 1 - stage, M)
    return P - 1 - stage


def weight_version(mode: str, P: int, stage: int, M: int, microbatch: int) -> int:
    """Weight version (number of optimizer steps applied) microbatch j runs on."""
    j = microbatch
    if mode == "flush":
        return j // M
    if mode == "2bw":
        return max(j // M - 1, 0)
    if mode == "stash":
        return max((j - (P - 1 - stage)) // M, 0)
    raise ScheduleError(f"unknown pipeline schedule {mode!r}; choose one of {', '.join(MODES)}.")


def gradient_delay(mode: str, P: int, stage: int, M: int, microbatch: int) -> int:
    """Optimizer steps between the weights a gradient was computed on and the
    weights it is applied to (step floor(j / M) updates version floor(j / M))."""
    return microbatch // M - weight_version(mode, P, stage, M, microbatch)


def resume_versions(mode: str, P: int, stage: int, M: int, step: int) -> List[int]:
    """Weight versions older than ``step`` that step ``step``'s microbatches run on:
    what a checkpoint of a drained pipeline after ``step`` steps must hold besides the
    live weights, for the resumed run to be exact (2bw: step - 1; stash: step - 1 at
    stages k < P - 1; flush: none)."""
    if step == 0 or not needs_snapshot(mode, P, stage):
        return []
    return sorted({weight_version(mode, P, stage, M, j) for j in range(step * M, (step + 1) * M)}
                  - set(range(step, step + 2)))


def needs_snapshot(mode: str, P: int, stage: int) -> bool:
    """Whether microbatches of this stage can still be in flight (or not yet
    started) when the version they use is replaced by an optimizer step, so
    that version must be kept in its own buffer. ``flush`` never; ``2bw``
    always (step t runs on version t - 1); ``stash`` unless it is the last
    stage, whose forward and backward are back to back."""
    if mode == "flush":
        return False
    if mode == "2bw":
        return True
    return P - 1 - stage > 0


def check(mode: str, P: int, M: int, stage: Optional[int] = None) -> None:
    if mode not in MODES:
        raise ScheduleError(f"unknown pipeline schedule {mode!r}; choose one of {', '.join(MODES)}.")
    if P < 1 or M < 1:
        raise ScheduleError(f"need pipeline size >= 1 and microbatches >= 1, got P={P}, M={M}.")
    if stage is not None and not 0 <= stage < P:
        raise ScheduleError(f"stage {stage} is outside 0..{P - 1}.")
    if mode == "2bw" and M < P:
        raise ScheduleError(
            f"the 2bw schedule needs at least as many microbatches per step as pipeline stages "
            f"(PipeDream-2BW: M >= P), got M={M} microbatches for P={P} stages. Raise "
            f"--global-batch-size (or lower --micro-batch-size) so that global_batch_size / "
            f"(micro_batch_size * data_parallel_size) >= {P}, or use --pipeline-schedule stash.")


def compute_order(mode: str, P: int, stage: int, M: int, first_step: int,
                  num_steps: int) -> Iterator[Tuple[str, int, Tuple[str, int]]]:
    """The compute stream (kind, index, phase) of one segment, no comms.

    kind is "F", "B" or "STEP"; phase is ("warmup" | "steady" | "cooldown",
    first microbatch of the 1F1B block).
    flush: per step, warm-up forwards, steady 1F1B, cool-down backwards.
    no-flush: the same three phases once over the whole segment; the optimizer
    step of t follows the backward of microbatch (t + 1) M - 1.
    """
    if mode == "flush":
        for t in range(first_step, first_step + num_steps):
            yield from _one_f_one_b(t * M, M, warmup_microbatches(mode, P, stage, M), M)
        return
    yield from _one_f_one_b(first_step * M, num_steps * M,
                            warmup_microbatches(mode, P, stage, M), M)


def _one_f_one_b(first: int, n: int, warmup: int, M: int):
    # Phases carry the block's first microbatch: communication is only folded
    # (send + receive in one call) between actions of the same 1F1B block.
    warmup = min(warmup, n)
    for j in range(first, first + warmup):
        yield "F", j, ("warmup", first)
    for i in range(n - warmup):
        yield "F", first + warmup + i, ("steady", first)
        yield "B", first + i, ("steady", first)
        if (first + i + 1) % M == 0:
            yield "STEP", (first + i) // M, ("steady", first)
    for j in range(first + n - warmup, first + n):
        yield "B", j, ("cooldown", first)
        if (j + 1) % M == 0:
            yield "STEP", j // M, ("cooldown", first)


def build_schedule(mode: str, P: int, stage: int, M: int, first_step: int = 0,
                   num_steps: int = 1) -> List[Action]:
    """All actions of one stage for ``num_steps`` optimizer steps, ending drained.

    Lowering follows Megatron's ``forward_backward_pipelining_without_interleaving``
    call for call (which P2PCommunicator method after which compute), so the
    ``flush`` list is Megatron's schedule; the no-flush lists are the same
    1F1B code run over the whole segment instead of one step.
    """
    check(mode, P, M, stage)
    first_stage, last_stage = stage == 0, stage == P - 1
    stream = list(compute_order(mode, P, stage, M, first_step, num_steps))
    actions: List[Action] = []
    loaded = None  # version the weights point at; reset to live by STEP

    def comm(*ops):
        # Megatron calls every P2P method on every stage; on the first / last
        # stage the missing neighbour makes the call a no-op, dropped here.
        kept = tuple(op for op in ops
                     if not ((op[0] in (SEND_F, RECV_B) and last_stage)
                             or (op[0] in (RECV_F, SEND_B) and first_stage)))
        if kept:
            actions.append(Action("COMM", ops=kept))

    def compute(kind, j):
        nonlocal loaded
        v = weight_version(mode, P, stage, M, j)
        if needs_snapshot(mode, P, stage) and loaded != v:
            actions.append(Action("W", version=v))
            loaded = v
        actions.append(Action(kind, microbatch=j, step=j // M, version=v))

    compute_only = [(k, j, ph) for k, j, ph in stream if k != "STEP"]
    pos = 0  # index into compute_only
    for kind, j, phase in stream:
        if kind == "STEP":
            actions.append(Action("STEP", step=j))
            loaded = None
            continue
        nxt = compute_only[pos + 1] if pos + 1 < len(compute_only) else None
        prev = compute_only[pos - 1] if pos > 0 else None
        pos += 1
        steady = ("steady", phase[1])
        if phase[0] == "warmup":                       # recv_forward; F; send_forward
            comm((RECV_F, j))
            compute("F", j)
            comm((SEND_F, j))
        elif phase[0] == "cooldown":                   # recv_backward; B; send_backward
            comm((RECV_B, j))
            compute("B", j)
            comm((SEND_B, j))
        elif kind == "F":
            if prev is None or prev[2] != steady:  # recv_forward before the steady state
                comm((RECV_F, j))
            compute("F", j)
            comm((SEND_F, j), (RECV_B, nxt[1]))     # send_forward_recv_backward
        else:
            compute("B", j)
            if nxt is not None and nxt[2] == steady:
                comm((SEND_B, j), (RECV_F, nxt[1]))  # send_backward_recv_forward
            else:
                comm((SEND_B, j))                   # last steady iteration
    return actions


def split_steps(actions: Sequence[Action]) -> List[List[Action]]:
    """Cut a segment's list after each STEP: one chunk per forward_backward call."""
    chunks, cur = [], []
    for a in actions:
        cur.append(a)
        if a.kind == "STEP":
            chunks.append(cur)
            cur = []
    if cur:
        chunks.append(cur)
    return chunks


def step_actions(mode: str, P: int, stage: int, M: int, segment_start: int, step: int,
                 last: bool) -> List[Action]:
    """The actions of one forward_backward call (optimizer step ``step``) in a
    segment that started at ``segment_start``; ``last`` ends the segment
    (cool-down). The no-flush stream is translation invariant after warm-up,
    so step t is cut from a 2-3 step window instead of the whole segment."""
    if step == segment_start or mode == "flush":
        return split_steps(build_schedule(mode, P, stage, M, step, 1 if last else 2))[0]
    return split_steps(build_schedule(mode, P, stage, M, step - 1, 2 if last else 3))[1]
