"""Replicas of several ranks (``--dp-ranks-per-replica R``) on real Megatron objects:
Megatron's synchronous data parallelism inside a replica, sparse averaging across.

The averager's own exactness for R = 2 (a single-process replay of 2 replicas x 2
ranks) is in tests/test_dataparallel.py; here the whole training path."""

import json
import os
import re

import pytest

from megatron_asyncmesh.config import parse_config
from megatron_asyncmesh.options import ConfigError
from tests.harness import REPO, launch, read_metrics, read_summary, train

TINY = os.path.join(REPO, "launch", "configs", "tiny.yaml")
SGD = ["--optimizer", "sgd", "--sgd-momentum", "0.9", "--clip-grad", "0", "--lr", "0.05",
       "--train-iters", "6", "--eval-interval", "3"]
DENSE = ["--dp-averaging", "sparse", "--dp-fraction", "1", "--dp-delay", "0",
         "--dp-correction", "avg"]
SPARSE = ["--dp-averaging", "sparse", "--dp-fraction", "0.25", "--dp-delay", "2",
          "--dp-ema-start", "0"]


def _losses(run_dir):
    train_rows, val_rows = read_metrics(run_dir)
    return [r["loss"] for r in train_rows], [r["val_loss"] for r in val_rows]


@pytest.fixture(scope="module")
def megatron_dp4(tmp_path_factory, tiny_data):
    """Megatron's own synchronous data parallelism over 4 ranks (DDP), SGD."""
    run_dir = str(tmp_path_factory.mktemp("dp4") / "sync")
    train(run_dir, nproc=4, args=[*SGD, "--data-path", tiny_data["data_path"],
                                  "--tokenizer-model", tiny_data["tokenizer_model"]])
    return _losses(run_dir), read_summary(run_dir)


def _close(sync, mesh):
    assert len(sync[0]) == len(mesh[0]) == 6 and len(sync[1]) == len(mesh[1]) == 3
    for x, y in zip(sync[0] + sync[1], mesh[0] + mesh[1]):
        assert abs(x - y) < 1e-5, (sync, mesh)


def test_dense_replicas_of_two_ranks_equal_megatron_data_parallel(tmp_path, data_args,
                                                                  megatron_dp4):
    """4 ranks = 2 replicas x 2 ranks, p = 1, tau = 0, SGD with momentum (linear in the
    gradient): Megatron's gradient all-reduce inside each replica, then the replicas'
    parameter mean every step, is Megatron's data parallelism over all 4 ranks up to
    rounding, at every step. Each rank sends half the model across the replicas."""
    mesh_dir = str(tmp_path / "replicas")
    res = train(mesh_dir, nproc=4, args=[*SGD, *DENSE, "--dp-ranks-per-replica", "2",
                                         *data_args])
    _close(megatron_dp4[0], _losses(mesh_dir))
    # The layout printed at start-up: replica-major ranks, the groups named.
    assert "2 replicas of 2 data-parallel rank(s) per stage" in res.output
    assert re.search(r"replica 0 \(host [^)]*\): ranks \[0, 1\]", res.output)
    assert "gradient all-reduce (inside a replica) groups: [[0, 1], [2, 3]]" in res.output
    assert "sparse averaging (across replicas) groups: [[0, 2], [1, 3]]" in res.output
    summary = read_summary(mesh_dir)
    model_bytes = megatron_dp4[1]["grad_all_reduce_bytes_per_step"][0]
    assert summary["replica_grad_all_reduce_bytes_per_step"] == [model_bytes] * 4
    for stats in summary["dp_averaging_stats"]:
        assert stats["replicas"] == 2 and stats["ranks_per_replica"] == 2
        assert stats["bytes_sent"] == 6 * model_bytes // 2      # half the model, 6 steps


def test_deepspeed_zero1_replicas_of_two_ranks_equal_megatron_data_parallel(
        tmp_path, data_args, megatron_dp4):
    """The DeepSpeed hook in the same shape: a ZeRO-1 engine per replica of 2 ranks
    (deepspeed.initialize with the replica as its data-parallel group), each rank
    averaging its own ZeRO-1 partition with the same partition of the other replica,
    then the replica's all-gather: dense averaging equals Megatron's DP over 4 ranks."""
    run_dir = str(tmp_path / "ds")
    res = launch(["-m", "megatron_asyncmesh.train_deepspeed", "--config", TINY, "--run-dir",
                  run_dir, "--no-progress", *SGD, *DENSE, "--dp-ranks-per-replica", "2",
                  "--zero-stage", "1", *data_args], nproc=4, timeout=240)
    _close(megatron_dp4[0], _losses(run_dir))
    assert "sparse averaging (across replicas) groups: [[0, 2], [1, 3]]" in res.output
    stats = read_summary(run_dir)["dp_averaging_stats"]
    assert {s["replicas"] for s in stats} == {2}
    assert sum(s["bytes_per_step"] for s in stats[:2]) >= \
        megatron_dp4[1]["grad_all_reduce_bytes_per_step"][0]     # the replica sends a model


@pytest.fixture(scope="module")
def zero1_replicas(tmp_path_factory, tiny_data):
    """2 replicas x 2 ranks with ZeRO-1 inside each replica, sparse averaging across;
    6 steps with a checkpoint at step 3, then a resume from it."""
    root = tmp_path_factory.mktemp("zero1")
    data = ["--data-path", tiny_data["data_path"], "--tokenizer-model",
            tiny_data["tokenizer_model"]]
    args = ["--train-iters", "6", "--eval-interval", "3", "--lr-warmup-iters", "1", *SPARSE,
            "--dp-ranks-per-replica", "2", "--use-distributed-optimizer", *data]
    full, resumed, ckpt = str(root / "full"), str(root / "resumed"), str(root / "ckpt")
    train(full, nproc=4, args=[*args, "--save", ckpt, "--save-interval", "3"])
    with open(os.path.join(ckpt, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("3")
    train(resumed, nproc=4, args=[*args, "--load", ckpt])
    return full, resumed, ckpt, data


def test_distributed_optimizer_inside_replicas_resumes_bitwise(zero1_replicas):
    full, resumed, _, _ = zero1_replicas
    a, b = read_metrics(full), read_metrics(resumed)
    after = [r for r in a[0] if r["step"] > 3]
    assert [(r["step"], r["loss"]) for r in after] == \
        [(r["step"], r["loss"]) for r in b[0] if r["step"] > 3]
    assert a[1][-1]["val_loss"] == b[1][-1]["val_loss"]
    assert a[1][-1]["consensus_val_loss"] == b[1][-1]["consensus_val_loss"]
    assert after[-1]["loss"] < a[0][0]["loss"]                     # it learnt


def test_resume_with_other_replicas_is_refused(zero1_replicas, tmp_path):
    """A checkpoint of 2 replicas x 2 ranks loaded as 4 one-rank replicas: refused with
    the saved and the asked shape, before anything is written."""
    _, _, ckpt, data = zero1_replicas
    run_dir = str(tmp_path / "other")
    res = train(run_dir, nproc=4, check=False, args=[
        "--train-iters", "6", *SPARSE, *data, "--load", ckpt])
    assert res.returncode != 0
    assert "holds 2 independent replicas of 2 data-parallel rank(s)" in res.output
    assert "--dp-ranks-per-replica 2" in res.output
    assert not os.path.exists(os.path.join(run_dir, "summary.json"))


@pytest.mark.parametrize("flags, message", [
    (["--dp-ranks-per-replica", "2"], "needs --dp-averaging sparse"),
    (["--dp-ranks-per-replica", "0", *SPARSE], "must be an integer >= 1"),
    ([*SPARSE, "--use-distributed-optimizer"], "needs replicas of several ranks"),
    ([*SPARSE, "--dp-ranks-per-replica", "2", "--use-distributed-optimizer", "--bf16"],
     "keeps each fp32 main parameter on one rank"),
])
def test_bad_replica_flags(flags, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config(["--config", TINY, *flags])


def test_replicas_must_divide_the_data_parallel_size():
    cfg = parse_config(["--config", TINY, *SPARSE, "--dp-ranks-per-replica", "3",
                        "--global-batch-size", "12"])
    with pytest.raises(ConfigError, match=r"does not divide the data-parallel size 4"):
        cfg.validate_world(4)
    assert cfg.validate_world(6) == 6
