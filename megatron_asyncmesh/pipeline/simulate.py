"""Run every stage's action list in one process: deadlock check, timing, memory.

No process group, no tensors: each stage is a program counter over its list
from ``schedule.build_schedule``. Compute actions take the given time; a COMM
action posts its sends/receives and completes when every peer operation has
been posted too and the data has crossed the link (rendezvous semantics, as
gloo/NCCL sends of activation-sized tensors behave, and what Megatron's
batched ``P2POp`` calls wait for). If no stage can move and some are not
finished, the schedule deadlocks: ``DeadlockError`` shows the stage x action
grid with each stage's blocked action marked.

With zero communication cost and uniform stages the simulated sync 1F1B step
is exactly (M + P - 1)(f + b) (bubble (P-1)/(M+P-1)), the analytic value;
the no-flush modes reach M (f + b) per step in steady state.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from megatron_asyncmesh.pipeline.schedule import (
    RECV_B, RECV_F, SEND_B, SEND_F, Action, build_schedule, needs_snapshot, weight_version)


class DeadlockError(RuntimeError):
    def __init__(self, message: str, grid: str):
        super().__init__(f"{message}\n{grid}")
        self.grid = grid


class ScheduleInvariantError(RuntimeError):
    pass


@dataclass
class Costs:
    """Per-stage compute times (any unit) and one inter-stage link.

    ``activation_bytes`` is the size of the [s, b, h] tensor crossing a stage
    boundary (the gradient has the same shape)."""
    forward: Sequence[float]
    backward: Sequence[float]
    optimizer_step: Sequence[float] = ()
    latency: float = 0.0
    bandwidth: Optional[float] = None      # bytes per time unit; None = infinite
    activation_bytes: float = 0.0

    @classmethod
    def uniform(cls, P: int, forward: float = 1.0, backward: float = 2.0, **kw) -> "Costs":
        return cls(forward=[forward] * P, backward=[backward] * P, **kw)

    def step_cost(self, stage: int) -> float:
        return self.optimizer_step[stage] if self.optimizer_step else 0.0

    def transfer(self) -> float:
        t = self.latency
        if self.bandwidth:
            t += self.activation_bytes / self.bandwidth
        return t


@dataclass
class Interval:
    stage: int
    kind: str          # "F", "B", "STEP", "COMM"
    start: float
    end: float
    microbatch: int = -1


@dataclass
class SimResult:
    mode: str
    P: int
    M: int
    num_steps: int
    makespan: float
    intervals: List[Interval]
    step_ends: List[List[float]]              # per stage, end time of each STEP
    peak_activations: List[int]               # in-flight microbatches per stage
    peak_weight_versions: List[int]           # stored versions per stage (live copy excluded)
    idle_slots: List[int] = field(default_factory=list)  # unit-cost simulations only

    def busy(self, stage: int, t0: float = float("-inf"), t1: float = float("inf")) -> float:
        total = 0.0
        for iv in self.intervals:
            if iv.stage == stage and iv.kind in ("F", "B", "STEP"):
                total += max(0.0, min(iv.end, t1) - max(iv.start, t0))
        return total

    def utilization(self) -> List[float]:
        """Busy fraction of each stage over the whole run (warm-up and drain included)."""
        return [self.busy(k) / self.makespan for k in range(self.P)]

    def steady_step_time(self) -> float:
        """Mean time between optimizer steps, ignoring the first and last steps
        (warm-up and drain), taken at the slowest stage."""
        best = 0.0
        for ends in self.step_ends:
            if len(ends) >= 4:
                best = max(best, (ends[-2] - ends[1]) / (len(ends) - 3))
            elif ends:
                best = max(best, ends[-1] / len(ends))
        return best

    def steady_utilization(self) -> List[float]:
        out = []
        for k, ends in enumerate(self.step_ends):
            if len(ends) >= 4:
                t0, t1 = ends[1], ends[-2]
                out.append(self.busy(k, t0, t1) / (t1 - t0))
            else:
                out.append(self.busy(k) / self.makespan)
        return out

    def summary(self) -> dict:
        return {"mode": self.mode, "P": self.P, "M": self.M, "num_steps": self.num_steps,
                "makespan": self.makespan, "steady_step_time": self.steady_step_time(),
                "utilization": self.utilization(),
                "steady_utilization": self.steady_utilization(),
                "bubble_fraction": 1.0 - sum(self.utilization()) / self.P,
                "peak_activations": self.peak_activations,
                "peak_weight_versions": self.peak_weight_versions,
                "idle_slots": self.idle_slots}


def _peer(stage: int, op: str) -> Tuple[int, str]:
    return {SEND_F: (stage + 1, RECV_F), RECV_F: (stage - 1, SEND_F),
            SEND_B: (stage - 1, RECV_B), RECV_B: (stage + 1, SEND_B)}[op]


def format_grid(programs: Sequence[Sequence[Action]], pcs: Sequence[int],
                window: int = 8) -> str:
    """Stage x action-index grid around each stage's program counter; the
    action a stage is blocked on is shown as >>act<<."""
    lo = max(0, min(pcs) - window)
    hi = max(pcs) + 3
    lines = ["stage | actions " + f"{lo}..{hi - 1} (>>x<< = blocked here, . = finished)"]
    for k, prog in enumerate(programs):
        cells = []
        for i in range(lo, min(hi, len(prog))):
            s = str(prog[i])
            cells.append(f">>{s}<<" if i == pcs[k] else s)
        if pcs[k] >= len(prog):
            cells.append(".")
        lines.append(f"{k:5d} | " + " ".join(cells))
    return "\n".join(lines)


def run_programs(programs: Sequence[Sequence[Action]], costs: Optional[Costs] = None, *,
                 mode: str = "?", M: int = 1, num_steps: int = 1) -> SimResult:
    """Execute per-stage action lists; check invariants; time them with ``costs``."""
    P = len(programs)
    costs = costs or Costs.uniform(P, 1.0, 1.0)
    pcs = [0] * P
    clock = [0.0] * P
    posted: Dict[Tuple[int, str, int], float] = {}     # (stage, op, mb) -> post time
    intervals: List[Interval] = []
    step_ends: List[List[float]] = [[] for _ in range(P)]
    steps_done = [0] * P
    in_flight: List[set] = [set() for _ in range(P)]
    forwarded: List[set] = [set() for _ in range(P)]
    backwarded: List[set] = [set() for _ in range(P)]
    peak_act = [0] * P
    loaded: List[Optional[int]] = [None] * P

    def fail(msg):
        raise ScheduleInvariantError(f"{msg}\n{format_grid(programs, pcs)}")

    progress = True
    while progress:
        progress = False
        for k in range(P):
            while pcs[k] < len(programs[k]):
                a = programs[k][pcs[k]]
                if a.kind == "COMM":
                    for op, mb in a.ops:
                        posted.setdefault((k, op, mb), clock[k])
                    ready = []
                    for op, mb in a.ops:
                        ps, pop = _peer(k, op)
                        if not 0 <= ps < P:
                            fail(f"stage {k}: {op}{mb} has no neighbour stage {ps}")
                        if (ps, pop, mb) not in posted:
                            break
                        ready.append(max(posted[(k, op, mb)], posted[(ps, pop, mb)]))
                    else:
                        end = max(ready) + costs.transfer()
                        intervals.append(Interval(k, "COMM", clock[k], end))
                        for op, mb in a.ops:
                            if op == RECV_F and mb not in forwarded[k - 1]:
                                fail(f"stage {k} receives activation {mb} before stage "
                                     f"{k - 1} computed it")
                        clock[k] = end
                        pcs[k] += 1
                        progress = True
                        continue
                    break  # blocked on a peer
                if a.kind == "W":
                    if a.version > steps_done[k]:
                        fail(f"stage {k} needs weight version {a.version} but has only "
                             f"done {steps_done[k]} optimizer steps")
                    loaded[k] = a.version
                elif a.kind in ("F", "B"):
                    j = a.microbatch
                    if a.version > steps_done[k]:
                        fail(f"stage {k}: {a} uses version {a.version} before it exists")
                    if loaded[k] is not None and loaded[k] != a.version:
                        fail(f"stage {k}: {a} runs on version {loaded[k]}, wants {a.version}")
                    cost = costs.forward[k] if a.kind == "F" else costs.backward[k]
                    if a.kind == "F":
                        if j in forwarded[k]:
                            fail(f"stage {k}: forward of microbatch {j} twice")
                        forwarded[k].add(j)
                        in_flight[k].add(j)
                        peak_act[k] = max(peak_act[k], len(in_flight[k]))
                    else:
                        if j not in in_flight[k]:
                            fail(f"stage {k}: backward of microbatch {j} without its forward")
                        in_flight[k].discard(j)
                        backwarded[k].add(j)
                    intervals.append(Interval(k, a.kind, clock[k], clock[k] + cost, j))
                    clock[k] += cost
                elif a.kind == "STEP":
                    need = set(range(a.step * M, (a.step + 1) * M))
                    if not need <= backwarded[k]:
                        fail(f"stage {k}: optimizer step {a.step} before backwards "
                             f"{sorted(need - backwarded[k])}")
                    cost = costs.step_cost(k)
                    intervals.append(Interval(k, "STEP", clock[k], clock[k] + cost))
                    clock[k] += cost
                    steps_done[k] += 1
                    step_ends[k].append(clock[k])
                    loaded[k] = None
                pcs[k] += 1
                progress = True
    if any(pc < len(prog) for pc, prog in zip(pcs, programs)):
        raise DeadlockError(f"deadlock: no stage can move (mode {mode}, P={P}, M={M})",
                            format_grid(programs, pcs))
    for k in range(P):
        if in_flight[k]:
            raise ScheduleInvariantError(f"stage {k} ends with microbatches {sorted(in_flight[k])} "
                                         "in flight (not drained)")
    makespan = max(clock) if clock else 0.0
    versions = [_peak_versions(programs[k], mode, P, k, M) for k in range(P)]
    return SimResult(mode, P, M, num_steps, makespan, intervals, step_ends, peak_act, versions)


def _peak_versions(program: Sequence[Action], mode: str, P: int, stage: int, M: int) -> int:
    """Peak number of stored weight versions besides the live weights, replaying the
    runtime store's ``swap`` rule: forwards on the live version run on the live storage;
    right before each optimizer step the versions no in-flight or next microbatch uses
    are freed, and the live version is kept (its storage retired as a snapshot) only if
    an in-flight microbatch ran on it or the next forward needs it."""
    if mode not in ("2bw", "stash") or not needs_snapshot(mode, P, stage):
        return 0
    forwards = [a for a in program if a.kind == "F"]
    if not forwards:
        return 0
    # The live version at the segment start: stash forwards use the newest weights; 2bw
    # step s runs on s - 1 while s is live.
    live = forwards[0].version if mode == "stash" else max(forwards[0].step, 0)
    alive = {forwards[0].version} - {live}
    uses: Dict[int, int] = {}
    fi = 0
    peak = len(alive)
    for a in program:
        if a.kind == "F":
            uses[a.version] = uses.get(a.version, 0) + 1
            if a.version != live:
                alive.add(a.version)
            fi += 1
        elif a.kind == "B":
            uses[a.version] -= 1
        elif a.kind == "STEP":
            peak = max(peak, len(alive))
            nxt = forwards[fi].version if fi < len(forwards) else None
            for v in sorted(alive):
                if uses.get(v, 0) == 0 and (nxt is None or v < nxt):
                    alive.discard(v)
            if uses.get(live, 0) > 0 or (nxt is not None and nxt <= live):
                alive.add(live)
            live = a.step + 1
            peak = max(peak, len(alive))
    return peak


def simulate(mode: str, P: int, M: int, num_steps: int = 4,
             costs: Optional[Costs] = None) -> SimResult:
    """Build every stage's list for one drained segment and run it."""
    programs = [build_schedule(mode, P, k, M, 0, num_steps) for k in range(P)]
    result = run_programs(programs, costs, mode=mode, M=M, num_steps=num_steps)
    if costs is None:
        result.idle_slots = _idle_slots(result)
    return result


def _idle_slots(result: SimResult) -> List[int]:
    """With unit costs, the number of unit time slots each stage spends idle
    before finishing (the bubble, counted)."""
    out = []
    for k in range(result.P):
        busy = result.busy(k)
        out.append(int(round(result.makespan - busy)))
    return out


COLORS = {"F": "#4c72b0", "B": "#55a868", "STEP": "#dd8452", "COMM": "#d0d0d0"}


def plot_timeline(intervals: Sequence, path: str, title: str = "", num_stages: Optional[int] = None,
                  time_unit: str = "") -> str:
    """Stages x time: forward blue, backward green, optimizer step orange,
    communication wait grey, idle white. Accepts ``Interval`` objects or dicts
    with the same fields (the runtime's timeline JSON)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    rows = [iv if isinstance(iv, dict) else iv.__dict__ for iv in intervals]
    P = num_stages or (max(r["stage"] for r in rows) + 1 if rows else 1)
    t0 = min((r["start"] for r in rows), default=0.0)
    fig, ax = plt.subplots(figsize=(12, 0.6 * P + 1.2))
    for kind in ("COMM", "F", "B", "STEP"):
        for stage in range(P):
            bars = [(r["start"] - t0, r["end"] - r["start"]) for r in rows
                    if r["stage"] == stage and r["kind"] == kind and r["end"] > r["start"]]
            if bars:
                ax.broken_barh(bars, (P - 1 - stage - 0.4, 0.8), facecolors=COLORS[kind])
    ax.set_yticks(range(P))
    ax.set_yticklabels([f"stage {P - 1 - i}" for i in range(P)])
    ax.set_xlabel(f"time{(' (' + time_unit + ')') if time_unit else ''}")
    ax.set_title(title)
    ax.legend(handles=[Patch(color=COLORS[k], label=lbl) for k, lbl in
                       (("F", "forward"), ("B", "backward"), ("STEP", "optimizer step"),
                        ("COMM", "p2p wait"))], loc="upper right", fontsize=8, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="Validate and simulate a pipeline schedule.")
    p.add_argument("--mode", default="2bw", choices=("flush", "2bw", "stash"))
    p.add_argument("--pipeline-model-parallel-size", "-P", type=int, default=4)
    p.add_argument("--num-microbatches", "-M", type=int, default=8)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--forward", type=float, default=1.0)
    p.add_argument("--backward", type=float, default=2.0)
    p.add_argument("--png", default=None)
    a = p.parse_args(argv)
    r = simulate(a.mode, a.pipeline_model_parallel_size, a.num_microbatches, a.steps,
                 Costs.uniform(a.pipeline_model_parallel_size, a.forward, a.backward))
    print(json.dumps(r.summary(), indent=1))
    if a.png:
        plot_timeline(r.intervals, a.png, f"{a.mode} P={r.P} M={r.M}", r.P)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
