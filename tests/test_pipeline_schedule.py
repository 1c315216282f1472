"""Schedules as data: deadlock freedom, bubbles, versions, Megatron's order.

Everything here runs in one process without a process group.
"""

from fractions import Fraction

import pytest

from megatron_asyncmesh.pipeline.schedule import (
    Action, MODES, ScheduleError, build_schedule, gradient_delay, step_actions, split_steps,
    weight_version)
from megatron_asyncmesh.pipeline.simulate import (
    Costs, DeadlockError, run_programs, simulate)

P_GRID = list(range(1, 17))
M_GRID = [1, 2, 3, 4, 5, 7, 8, 12, 16, 24, 32]


@pytest.mark.parametrize("mode", MODES)
def test_every_supported_config_runs_without_deadlock(mode):
    """P = 1..16, M up to 32: every stage finishes, every microbatch is
    forwarded and backwarded once per stage, every version exists when used
    (the simulator raises otherwise)."""
    checked = 0
    for P in P_GRID:
        for M in M_GRID:
            if mode == "2bw" and M < P:
                with pytest.raises(ScheduleError):
                    build_schedule(mode, P, 0, M)
                continue
            r = simulate(mode, P, M, num_steps=3)
            assert all(len(ends) == 3 for ends in r.step_ends)
            checked += 1
    assert checked >= 90


@pytest.mark.parametrize("P,M", [(2, 1), (2, 4), (3, 5), (4, 4), (4, 8), (8, 16), (16, 32)])
@pytest.mark.parametrize("f,b", [(1, 1), (1, 2), (2, 3)])
def test_flush_bubble_is_the_analytic_one(P, M, f, b):
    """Sync 1F1B: each step takes (M + P - 1)(f + b); each stage idles
    (P - 1)/(M + P - 1) of it. Integer costs, so the equality is exact."""
    r = simulate("flush", P, M, num_steps=5, costs=Costs.uniform(P, f, b))
    for ends in r.step_ends:
        diffs = {e1 - e0 for e0, e1 in zip(ends, ends[1:])}
        assert diffs == {(M + P - 1) * (f + b)}
    for u in r.steady_utilization():
        assert Fraction(u).limit_denominator(10_000) == Fraction(M, M + P - 1)


@pytest.mark.parametrize("mode", ["2bw", "stash"])
@pytest.mark.parametrize("P,M", [(2, 2), (2, 4), (4, 4), (4, 8), (8, 8), (16, 32)])
def test_async_steady_state_has_no_bubble(mode, P, M):
    r = simulate(mode, P, M, num_steps=8, costs=Costs.uniform(P, 1, 2))
    assert r.steady_step_time() == M * 3
    assert r.steady_utilization() == [1.0] * P
    # ... and the run as a whole beats flush by close to (M + P - 1) / M.
    sync = simulate("flush", P, M, num_steps=8, costs=Costs.uniform(P, 1, 2))
    assert sync.steady_step_time() / r.steady_step_time() == pytest.approx((M + P - 1) / M)


def test_idle_slots_counted():
    r = simulate("flush", 4, 4, num_steps=1)  # unit costs: f = b = 1
    assert r.idle_slots == [6, 6, 6, 6]       # (P - 1)(f + b) per stage
    a = simulate("2bw", 4, 4, num_steps=1)
    assert a.idle_slots == r.idle_slots       # one step: warm-up + drain only


def test_slow_link_is_priced():
    fast = simulate("2bw", 4, 8, 6, Costs.uniform(4, 1, 2))
    slow = simulate("2bw", 4, 8, 6, Costs.uniform(4, 1, 2, latency=0.5, bandwidth=10.0,
                                                   activation_bytes=10.0))
    assert slow.steady_step_time() > fast.steady_step_time()


def test_broken_schedule_reports_deadlock_with_grid():
    P, M = 3, 4
    programs = [build_schedule("flush", P, k, M) for k in range(P)]
    # Stage 1 waits for a gradient before sending the activation that would
    # produce it: move its first receive-backward in front of everything.
    prog = list(programs[1])
    idx = next(i for i, a in enumerate(prog) if a.kind == "COMM" and a.ops[0][0] == "rb"
               or (a.kind == "COMM" and any(op == "rb" for op, _ in a.ops)))
    rb = next((op, mb) for op, mb in prog[idx].ops if op == "rb")
    prog.insert(0, Action("COMM", ops=(rb,)))
    programs[1] = prog
    with pytest.raises(DeadlockError) as info:
        run_programs(programs, mode="flush", M=M)
    grid = info.value.grid
    assert "stage" in grid and ">>C(rb0)<<" in grid
    assert len(grid.splitlines()) == P + 1


def test_version_before_it_exists_is_reported():
    from megatron_asyncmesh.pipeline.simulate import ScheduleInvariantError

    programs = [build_schedule("2bw", 2, k, 2, 0, 3) for k in range(2)]
    programs[1] = [Action("W", version=2) if a.kind == "W" else a for a in programs[1]]
    with pytest.raises(ScheduleInvariantError, match="version 2"):
        run_programs(programs, mode="2bw", M=2)


def test_delay_semantics():
    for P in (2, 4, 8):
        for M in (P, 2 * P):
            for k in range(P):
                # 2bw: delay exactly 1 at every stage once past the first step.
                assert {gradient_delay("2bw", P, k, M, j) for j in range(M, 5 * M)} == {1}
                # flush: never stale.
                assert {gradient_delay("flush", P, k, M, j) for j in range(5 * M)} == {0}
        for k in range(P):
            # stash with M = 1: P - 1 - k (first stage stalest) in steady state.
            assert gradient_delay("stash", P, k, 1, 10 * P) == P - 1 - k
    assert weight_version("2bw", 4, 0, 4, 3) == 0 and weight_version("2bw", 4, 0, 4, 8) == 1


def test_2bw_rejects_too_few_microbatches():
    with pytest.raises(ScheduleError, match=r"M >= P.*global-batch-size"):
        build_schedule("2bw", 4, 0, 3)


def test_weight_memory():
    """Stored versions besides the live weights: 2bw one per stage (two copies in all,
    PipeDream-2BW's double buffer), stash P - 1 - k (M = 1)."""
    r = simulate("2bw", 4, 8, 6)
    assert r.peak_weight_versions == [1, 1, 1, 1]
    s = simulate("stash", 4, 1, 8)
    assert s.peak_weight_versions == [3, 2, 1, 0]   # last stage runs on the live weights
    assert s.peak_activations == [4, 3, 2, 1]


def test_step_chunks_match_the_segment():
    """The executor cuts step t from a short window; it must equal cutting the
    whole segment (translation invariance of the no-flush stream)."""
    for mode in MODES:
        P, M, steps = 4, 4, 7
        for k in range(P):
            full = split_steps(build_schedule(mode, P, k, M, 0, steps))
            for t in range(steps):
                assert step_actions(mode, P, k, M, 0, t, t == steps - 1) == full[t], (mode, k, t)


class _Recorder:
    """Stands in for P2PCommunicator and records Megatron's calls, dropping
    those that are no-ops on a first/last stage."""

    def __init__(self, P, stage, log, config=None):
        self.config = config
        self.total_stages, self.current_stage = P, stage
        self.is_pp_first_stage, self.is_pp_last_stage = stage == 0, stage == P - 1
        self.log = log

    def _rec(self, name, noop):
        if not noop:
            self.log.append(name)

    def recv_forward(self, shapes, is_first):
        self._rec("recv_forward", is_first)

    def recv_backward(self, shapes, is_last):
        self._rec("recv_backward", is_last)

    def send_forward(self, t, is_last):
        self._rec("send_forward", is_last)

    def send_backward(self, t, is_first):
        self._rec("send_backward", is_first)

    def send_forward_recv_backward(self, t, shapes, is_last):
        self._rec("send_forward_recv_backward", is_last)

    def send_backward_recv_forward(self, t, shapes, is_first):
        self._rec("send_backward_recv_forward", is_first)


_CALL = {("rf",): "recv_forward", ("rb",): "recv_backward", ("sf",): "send_forward",
         ("sb",): "send_backward", ("rb", "sf"): "send_forward_recv_backward",
         ("rf", "sb"): "send_backward_recv_forward"}


def _ours(P, k, M):
    out = []
    for a in build_schedule("flush", P, k, M):
        if a.kind == "F":
            out.append(f"F{a.microbatch}")
        elif a.kind == "B":
            out.append("B")
        elif a.kind == "COMM":
            out.append(_CALL[tuple(sorted(op for op, _ in a.ops))])
    return out


@pytest.mark.parametrize("P", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("M", [1, 2, 3, 4, 8])
def test_flush_list_is_megatrons_schedule(monkeypatch, P, M):
    """Run Megatron's forward_backward_pipelining_without_interleaving for each
    stage with recording stand-ins for the communicator and compute, and
    compare its call sequence with the lowered ``flush`` list."""
    import megatron_asyncmesh  # noqa: F401  (CPU layer)
    import torch
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(num_layers=P, hidden_size=8, num_attention_heads=2,
                               pipeline_dtype=torch.float32, pipeline_model_parallel_size=P)

    class _Group:
        def size(self):
            return 1

    class _Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = config

    for k in range(P):
        log = []

        def fwd(*args, current_microbatch=None, **kwargs):
            log.append(f"F{current_microbatch}")
            return torch.zeros(1), torch.tensor(1)

        def bwd(*args, **kwargs):
            log.append("B")

        monkeypatch.setattr(schedules, "forward_step", fwd)
        monkeypatch.setattr(schedules, "backward_step", bwd)
        pg = ProcessGroupCollection()
        pg.tp, pg.cp = _Group(), _Group()
        schedules.forward_backward_pipelining_without_interleaving(
            forward_step_func=None, data_iterator=None, model=[_Model()], num_microbatches=M,
            seq_length=4, micro_batch_size=1, p2p_communicator=_Recorder(P, k, log, config),
            pg_collection=pg)
        assert log == _ours(P, k, M), f"stage {k}"
