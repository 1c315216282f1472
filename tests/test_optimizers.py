"""Optimizers against staleness: reference math, wrappers, stage delays, bad input.

Reference tests run a real Megatron-core GPTModel + the optimizer
``megatron_asyncmesh.optim.builder.build_optimizer`` returns (registry entry, Megatron's
parameter groups, its FP32Optimizer / ChainedOptimizer wrappers) against the
reference optimizers built directly from torch / emerging-optimizers on an
identical copy of the model (``tests/optim_worker.py``). Both sides run the
same float32 CPU kernels in the same order, so they agree bitwise; the test
allows 1e-6 (parameters are O(0.02-1)), far below the ~1e-3 a single wrong
hyperparameter (beta, weight decay, Nesterov flag, basis refresh) causes over
five steps, which ``moved`` bounds from below.
"""

import json
import math
import os

import pytest
import torch

from tests.harness import REPO, TINY, launch, read_metrics, read_summary, train


def _worker(tmp_path, optimizer, *extra):
    out = str(tmp_path / f"{optimizer}.json")
    launch([os.path.join(REPO, "tests", "optim_worker.py"), "--optimizer", optimizer,
            "--out", out, *extra], nproc=1, timeout=300)
    with open(out) as f:
        return json.load(f)


@pytest.mark.parametrize("optimizer,inner", [
    ("nadamw", ["NAdamW"]),
    ("muon", ["TensorParallelMuon", "AdamW"]),
    ("soap", ["StageAwareSOAP", "AdamW"]),
])
def test_megatron_optimizer_matches_reference(tmp_path, optimizer, inner):
    res = _worker(tmp_path, optimizer)
    assert len(res["diffs"]) == 5
    assert max(res["diffs"]) <= 1e-6, res["diffs"]
    assert res["moved"] > 1e-3                  # the parameters did move
    assert sorted(res["inner"]) == sorted(inner)
    if optimizer != "nadamw":                   # matrices to the method, the rest to AdamW
        assert "matrix" in res["kinds"].values() and "other" in res["kinds"].values()
    if optimizer == "muon":                     # fp32 Newton-Schulz on CPU (auto), not bf16
        assert res["matmul_prec"] == ["-", "highest"], res["matmul_prec"]


def test_decoupled_lr_trains_embedding_and_output_at_their_own_rate(tmp_path):
    """--decoupled-lr (Megatron's param-group override, through the run's scheduler):
    Muon + AdamW against references that train the input embedding and the output
    layer's AdamW at 3e-4 and every other tensor at --lr 3e-3. A run that ignored the
    flag (everything at 3e-3) would differ by ~1e-3 after five steps."""
    res = _worker(tmp_path, "muon", "--decoupled-lr", "3e-4")
    assert max(res["diffs"]) <= 1e-6, res["diffs"]
    assert res["moved"] > 1e-3


def test_error_feedback_state_survives_a_checkpoint(tmp_path):
    """The previous-update buffer goes through Megatron's sharded_state_dict and
    dist_checkpointing: 2 steps + save + load into fresh objects + 2 steps equals 4
    steps bitwise; dropping the buffer (fresh optimizer state) does not."""
    res = _worker(tmp_path, "nadamw", "--ef-resume", str(tmp_path / "ckpt"))
    assert res["diff"] == 0.0
    assert res["diff_without_state"] > 1e-4


# --- pieces that need no model ---------------------------------------------------------

def test_stage_delay_from_schedule():
    from megatron_asyncmesh.optim.builder import stage_delay

    assert [stage_delay("flush", 4, k, 4) for k in range(4)] == [0, 0, 0, 0]
    assert [stage_delay("2bw", 4, k, 4) for k in range(4)] == [1, 1, 1, 1]
    # stash: the first P-1-k microbatches of a step ran forward before the last update.
    assert [stage_delay("stash", 4, k, 4) for k in range(4)] == [0.75, 0.5, 0.25, 0.0]
    assert stage_delay("stash", 4, 0, 8) == 3 / 8
    assert stage_delay("2bw", 1, 0, 1) == 0


def test_start_up_names_each_stage_staleness_and_asks_for_more_microbatches():
    from megatron_asyncmesh.optim.builder import describe_staleness

    line = describe_staleness("stash", 4, 4)
    assert "M = 4" in line and "0.75, 0.5, 0.25, 0" in line
    assert "M >= 2P (8 here" in line                 # stage 0 over half a step stale
    assert "0.375, 0.25, 0.125, 0" in describe_staleness("stash", 4, 8)
    assert "M >= 2P" not in describe_staleness("stash", 4, 8)
    assert "M >= 2P" not in describe_staleness("stash", 2, 2)    # 1/2: the limit
    # 2bw is a full step late at every stage whatever M: no hint about M
    assert "1, 1" in describe_staleness("2bw", 2, 4)
    assert "M >= 2P" not in describe_staleness("2bw", 4, 4)


def test_soap_frequency_one_is_the_library_soap():
    from emerging_optimizers.soap import SOAP

    from megatron_asyncmesh.optim.soap import StageAwareSOAP

    torch.manual_seed(0)
    w0 = torch.randn(12, 7)
    a, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    oa = StageAwareSOAP([a], lr=1e-2, precondition_frequency=1)
    ob = SOAP([b], lr=1e-2)
    for t in range(6):
        g = torch.randn(12, 7)
        a.grad, b.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
        assert torch.equal(a, b)


def test_soap_refreshes_basis_every_f_steps_and_keeps_factor_ema():
    from megatron_asyncmesh.optim.soap import StageAwareSOAP

    torch.manual_seed(1)
    p = torch.nn.Parameter(torch.randn(10, 6))
    opt = StageAwareSOAP([p], lr=1e-2, precondition_frequency=3)
    seen = []
    for t in range(7):
        p.grad = torch.randn(10, 6)
        before = {k: opt.state[p][k].clone() for k in ("Q_L", "Q_R", "L")} if t else None
        opt.step()
        if t:
            s = opt.state[p]
            seen.append((not torch.equal(before["Q_L"], s["Q_L"]),
                         not torch.equal(before["L"], s["L"])))
    # refresh at steps 0, 3, 6 only; the Kronecker factors' EMA moves every step
    assert [q for q, _ in seen] == [False, False, True, False, False, True]
    assert all(l for _, l in seen)


def test_stage_refresh_frequency():
    from megatron_asyncmesh.optim.soap import stage_refresh_frequency

    assert stage_refresh_frequency(10, 0.0) == 10
    assert stage_refresh_frequency(10, 1.0) == 5
    assert stage_refresh_frequency(10, 0.75) == 6
    assert stage_refresh_frequency(1, 1.0) == 1


class _Shim:
    """The part of a MegatronOptimizer the wrapper uses: step() -> (ok, norm, zeros)."""

    def __init__(self, opt):
        self.opt = opt
        self.param_groups = opt.param_groups

    def step(self):
        self.opt.step()
        return True, 0.0, 0


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_error_feedback_is_the_two_line_recurrence(alpha):
    from megatron_asyncmesh.optim.feedback import DelayErrorFeedback

    A = torch.tensor([[2.0, 0.3], [0.3, 1.0]])

    def grad(w):                                 # f(w) = 0.5 w^T A w + sin(w).sum()
        return A @ w + torch.cos(w)

    lr = 0.1
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = DelayErrorFeedback(_Shim(torch.optim.SGD([w], lr=lr)), [w], alpha)
    ref, u_prev = torch.tensor([1.0, -2.0]), None
    for t in range(8):
        w.grad = grad(w.detach())
        opt.step()
        u = -lr * grad(ref)                      # the inner update at step t
        ref = ref + u + (alpha * (u - u_prev) if u_prev is not None else 0)
        u_prev = u
        assert torch.allclose(w.detach(), ref, atol=1e-6, rtol=0), (t, w, ref)


def test_pipemare_factor():
    from megatron_asyncmesh.optim.feedback import PipeMareLR

    class Sched:
        num_steps = 0

        def step(self, increment):
            self.num_steps += increment
            for g in opt.param_groups:
                g["lr"] = 1.0

    w = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([w], lr=1.0)
    pm = PipeMareLR(Sched(), opt, tau=2.0, anneal_steps=4, global_batch=8)
    lrs = []
    for t in range(6):
        pm.step(increment=8)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == pytest.approx([2 ** -(1 - s / 4) for s in (1, 2, 3)] + [1.0, 1.0, 1.0])
    assert pm.factor(0) == 0.5


# --- through the training entry point ---------------------------------------------------

STEPS = ["--train-iters", "6", "--eval-interval", "6", "--eval-iters", "1",
         "--lr-warmup-iters", "1"]


@pytest.mark.parametrize("optimizer,extra,tol", [
    # (The replicated FP32Optimizer path is Megatron's plain DDP + optimizer; the sharded
    # one is where DP = 2 can go wrong.)
    ("nadamw", ["--use-layer-wise-distributed-optimizer"], 2e-5),
    ("muon", ["--use-layer-wise-distributed-optimizer"], 2e-5),
    # SOAP runs Adam in the eigenbasis of the gradient's Kronecker factors: coordinates
    # whose rotated gradient is at rounding level get updates of +-lr (Adam's early
    # steps are sign-like), so reordering the DP sum (or the grad-norm sum of the
    # sharded optimizer) moves losses by up to ~5e-4 within 6 steps; measured the same
    # for the replicated wrapper. A dropped or double-counted shard moves them by >1e-2.
    ("soap", ["--use-layer-wise-distributed-optimizer"], 2e-3),
], ids=["nadamw-layerwise", "muon-layerwise", "soap-layerwise"])
def test_data_parallel_equals_single_rank(tmp_path, data_args, optimizer, extra, tol):
    one, two = str(tmp_path / "dp1"), str(tmp_path / "dp2")
    args = [*data_args, *STEPS, "--optimizer", optimizer, "--global-batch-size", "8",
            "--micro-batch-size", "2"]
    train(one, 1, args)
    train(two, 2, [*args, *extra])
    a = [r["loss"] for r in read_metrics(one)[0]]
    b = [r["loss"] for r in read_metrics(two)[0]]
    assert len(a) == len(b) == 6
    # Same global batch; DP = 2 only reorders float32 sums (see test_parity).
    assert b == pytest.approx(a, abs=tol)
    assert a[-1] < a[0] - 0.1
    assert read_summary(two)["data_parallel_size"] == 2


@pytest.mark.parametrize("args,message", [
    (["--optimizer", "muon", "--use-distributed-optimizer"],
     "--use-layer-wise-distributed-optimizer"),
    (["--optimizer", "soap", "--use-distributed-optimizer"], "whole weight matrices"),
    (["--optimizer", "nadamw", "--use-distributed-optimizer"],
     "--use-layer-wise-distributed-optimizer"),
    (["--delay-error-feedback", "1.5"], "--delay-error-feedback must be in [0, 1]"),
    (["--optimizer", "lamb"], "invalid choice: 'lamb'"),
    (["--decoupled-min-lr", "1e-3"], "--decoupled-min-lr 0.001 needs --decoupled-lr"),
    (["--decoupled-lr", "1e-3", "--decoupled-min-lr", "1e-2"],
     "need 0 <= --decoupled-min-lr <= --decoupled-lr"),
])
def test_bad_optimizer_choices(capsys, args, message):
    """Refused while parsing, before any process group exists (the entry point's exit
    path for bad input on every rank: tests/test_config.py)."""
    from megatron_asyncmesh import train as entry

    try:
        code = entry.main(["--config", TINY, *STEPS, *args])
    except SystemExit as exc:           # argparse's own refusal ("invalid choice")
        code = exc.code
    assert code == 2
    assert message in capsys.readouterr().err


ASYNC = ["--pipeline-model-parallel-size", "2", "--untie-embeddings-and-output-weights",
         "--global-batch-size", "8", "--micro-batch-size", "2", "--train-iters", "8",
         "--eval-interval", "8", "--eval-iters", "1", "--lr-warmup-iters", "1"]


@pytest.mark.parametrize("nproc,args,expect", [
    (2, ["--pipeline-schedule", "stash", "--optimizer", "soap",
         "--soap-precondition-frequency", "10"],
     # M = 4, P = 2: stage 0's first microbatch of each step ran before the last update
     {"0": {"delay": 0.25, "soap_refresh_every": 8}, "1": {"delay": 0.0, "soap_refresh_every": 10}}),
    (2, ["--pipeline-schedule", "2bw", "--optimizer", "nadamw", "--nadamw-stage-aware",
         "--pipemare-anneal-iters", "4"],
     {"0": {"beta1": 0.99, "lr_mult": 0.5, "pipemare_tau": 2.0},
      "1": {"beta1": 0.9, "lr_mult": 1.0, "pipemare_tau": 2.0}}),
    (4, ["--pipeline-schedule", "2bw", "--optimizer", "muon",
         "--use-layer-wise-distributed-optimizer", "--global-batch-size", "16"],
     {"0": {"delay": 1.0}, "1": {"delay": 1.0}}),
    (2, ["--pipeline-schedule", "stash", "--optimizer", "muon"],
     {"0": {"delay": 0.25}, "1": {"delay": 0.0}}),
    (2, ["--pipeline-schedule", "flush", "--optimizer", "nadamw",
         "--delay-error-feedback", "0.5"],          # no delay, so no correction
     {"0": {"delay": 0.0, "error_feedback_alpha": 0.0}, "1": {"delay": 0.0}}),
    # 2bw + Muon + error feedback and flush + SOAP train in tests/test_checkpoint.py's
    # resume cases, with the same checks.
], ids=["stash-soap", "2bw-nadamw-stage-aware-pipemare", "2bw-muon-layerwise-pp2xdp2",
        "stash-muon", "flush-nadamw"])
def test_async_schedules_train_with_each_method(tmp_path, data_args, nproc, args, expect):
    run = str(tmp_path)
    train(run, nproc, [*data_args, *ASYNC, *args])
    losses = [r["loss"] for r in read_metrics(run)[0]]
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.1, losses
    stages = read_summary(run)["stage_optimizer"]
    for stage, fields in expect.items():
        for k, v in fields.items():
            assert stages[stage][k] == pytest.approx(v), (stage, k, stages[stage])
