"""--save/--load through Megatron's dist_checkpointing: resume equals never stopping."""

import glob
import json
import math
import os
import shutil

import pytest

from tests.harness import TINY, evaluate, launch, read_metrics, read_summary, train

COMMON = ["--train-iters", "8", "--lr-warmup-iters", "2", "--eval-interval", "100",
          "--eval-iters", "1", "--pipeline-model-parallel-size", "2"]


@pytest.mark.parametrize("opt_args,expect", [
    # (flush + Adam resumes in test_kill_a_rank_in_the_middle_of_a_save.)
    (["--optimizer", "soap", "--soap-precondition-frequency", "3"],
     {"0": {"soap_refresh_every": 3}, "1": {"soap_refresh_every": 3}}),
    # No-flush pipelines: the checkpoint also holds the previous step's weights, on which
    # the resumed step's microbatches run (2bw everywhere, stash at stage 0), and the
    # error-feedback buffer (stash: stage 1 has no delay, so no buffer).
    # (+ the PipeMare learning-rate correction, whose annealing continues after a resume)
    (["--pipeline-schedule", "stash", "--untie-embeddings-and-output-weights",
      "--optimizer", "nadamw", "--delay-error-feedback", "1.0", "--pipemare-anneal-iters",
      "6"],
     # error feedback scales alpha by the stage's delay
     {"0": {"delay": 0.25, "error_feedback_alpha": 0.25, "pipemare_tau": 1.25},
      "1": {"delay": 0.0}}),
    (["--pipeline-schedule", "2bw", "--untie-embeddings-and-output-weights",
      "--optimizer", "muon", "--delay-error-feedback", "0.5"],
     {"0": {"delay": 1.0, "error_feedback_alpha": 0.5},
      "1": {"delay": 1.0, "error_feedback_alpha": 0.5}}),
    # The full asynchronous mesh, PP = 2 x DP = 2: every replica's own weights and
    # optimizer state, its averages still waiting for their delay and its drift EMA.
    (["--pipeline-schedule", "2bw", "--untie-embeddings-and-output-weights",
      "--optimizer", "nadamw", "--dp-averaging", "sparse", "--dp-fraction", "0.25",
      "--dp-delay", "2", "--dp-correction", "ema", "--dp-ema-start", "3"],
     {"0": {"delay": 1.0}, "1": {"delay": 1.0}}),
], ids=["soap", "stash-nadamw-ef-pipemare", "2bw-muon-ef", "mesh-2bw-nadamw-sparse"])
def test_resume_matches_straight_run(tmp_path, data_args, opt_args, expect):
    """Optimizer state (NAdam's mu_product, Muon's momentum, SOAP's factors / basis /
    refresh phase, error feedback), the pipeline's weight versions and the sparse
    averaging's state go through Megatron's sharded_state_dict: resuming from step 4
    gives the straight run's losses bitwise."""
    first, second = (str(tmp_path / n) for n in ("first", "second"))
    ckpt = str(tmp_path / "ckpt")
    args = [*data_args, *COMMON, *opt_args]
    nproc = 4 if "--dp-averaging" in opt_args else 2
    # The straight run: 8 steps, checkpointing at 4 and 8 on the way (a checkpoint
    # drains a no-flush pipeline, which does not change what it computes).
    shm = "/dev/shm/deepspeed_allreduce_buffer_*"
    before = set(glob.glob(shm))
    train(first, nproc, [*args, "--save", ckpt, "--save-interval", "4"],
          launcher="deepspeed" if nproc == 4 else "torchrun")
    # DeepSpeed's CPU all-reduce maps a 69 MB file per rank under the deepspeed launcher
    # and never removes it; the run unlinks them once every rank has mapped them.
    assert set(glob.glob(shm)) <= before
    # Every method trains under its schedule, with the stage delays derived from it.
    losses = [r["loss"] for r in read_metrics(first)[0]]
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.1, losses
    stages = read_summary(first)["stage_optimizer"]
    for stage, fields in expect.items():
        for k, v in fields.items():
            assert stages[stage][k] == pytest.approx(v), (stage, k, stages[stage])
    summary = read_summary(first)
    if nproc == 2 and "--pipeline-schedule" in opt_args:
        # Measured on the timeline (tests/test_pipeline_exact.py proves the semantics):
        # 2bw delays every stage by one step; stash (P = 2, M = 4) one microbatch in
        # four at stage 0, none at the last stage. Both stages busy, all phases seen.
        delay = summary["stage_delay"]
        if "2bw" in opt_args:
            assert delay["0"]["max"] == delay["1"]["max"] == 1
        else:
            assert delay["0"]["max"] == 1 and 0 < delay["0"]["mean"] < 1
            assert delay["1"]["max"] == 0
        assert all(0.0 < u <= 1.0 for u in summary["stage_utilization"].values())
        for r in range(2):
            with open(os.path.join(first, "timeline", f"rank{r}.json")) as f:
                kinds = {iv["kind"] for iv in json.load(f)["intervals"]}
            assert {"F", "B", "STEP", "COMM"} <= kinds
        assert os.path.getsize(os.path.join(first, "timeline.png")) > 10_000
    if nproc == 4:        # the full mesh, from the training entry point under `deepspeed`
        s = read_summary(first)
        assert s["world_size"] == 4 and s["data_parallel_size"] == 2
        assert s["launcher"] == "env"
        stats = s["dp_averaging_stats"]
        assert all(a["steps"] == 8 and a["replicas"] == 2 and a["bytes_sent"] > 0
                   for a in stats)
        # One model: every evaluation also evaluates the replicas' mean, and the run ends
        # by averaging the replicas (--dp-final-average), so the last checkpoint's
        # replicas are that model, whose loss the run reported.
        assert all(v["consensus_val_loss"] is not None and v["consensus_bytes"] > 0
                   for v in read_metrics(first)[1])
        assert s["final_average_bytes"] > 0
        last = os.path.join(ckpt, "iter_0000008")
        one = evaluate("--checkpoint", last, "--replica", "1")["val_loss"]
        mean = evaluate("--checkpoint", last, "--replica", "mean")["val_loss"]
        assert one == pytest.approx(mean, abs=1e-6)
        assert mean == pytest.approx(s["consensus_val_loss"], abs=1e-4)
    assert open(os.path.join(ckpt, "latest_checkpointed_iteration.txt")).read() == "8"
    assert sorted(os.listdir(ckpt)) == ["iter_0000004", "iter_0000008",
                                        "latest_checkpointed_iteration.txt"]
    # Resume from step 4: point --load at a copy whose latest is 4.
    resume = str(tmp_path / "resume")
    os.makedirs(resume)
    shutil.copytree(os.path.join(ckpt, "iter_0000004"), os.path.join(resume, "iter_0000004"))
    with open(os.path.join(resume, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("4")
    train(second, nproc, [*args, "--load", resume])
    ref = {r["step"]: r["loss"] for r in read_metrics(first)[0]}
    got = {r["step"]: r["loss"] for r in read_metrics(second)[0]}
    assert sorted(got) == [5, 6, 7, 8]
    # fp32 on CPU, same reduction order: the resumed losses are bitwise equal.
    assert [got[s] for s in got] == [ref[s] for s in got]


def test_load_without_checkpoint_is_an_error(tmp_path, data_args):
    res = train(str(tmp_path / "run"), 1, [*data_args, "--load", str(tmp_path)], check=False,
                timeout=120)
    assert res.returncode != 0 and not res.timed_out  # torchrun reports a failed child as 1
    assert "no latest_checkpointed_iteration.txt there" in res.output


def test_checkpoint_metadata_keep_last_and_bad_checkpoints(tmp_path, data_args):
    """Metadata with checksums, --save-keep-last, the save and drain times recorded; a
    truncated shard, a corrupted byte, missing metadata, a newer format version and
    a different model are refused with a message naming the problem."""
    from megatron_asyncmesh.checkpoint.integrity import META, CheckpointError, verify

    from megatron_asyncmesh.config import parse_config

    ckpt = str(tmp_path / "ckpt")
    run = str(tmp_path / "run")
    common = [*data_args, *COMMON, "--untie-embeddings-and-output-weights"]
    train(run, 2, [*common, "--train-iters", "6", "--save", ckpt, "--save-interval", "2",
                   "--save-keep-last", "2"])
    assert sorted(os.listdir(ckpt)) == ["iter_0000004", "iter_0000006",
                                        "latest_checkpointed_iteration.txt"]
    saves = read_summary(run)["checkpoints"]
    assert [c["step"] for c in saves] == [2, 4, 6] and all(c["checkpoint_save_s"] > 0
                                                          for c in saves)
    good = os.path.join(ckpt, "iter_0000006")
    meta = verify(good)
    assert meta["format_version"] == 1 and meta["layout"]["hidden_size"] == 64
    shard = max((f for f in meta["files"]), key=lambda f: meta["files"][f]["bytes"])

    def broken(name, edit):
        copy = str(tmp_path / name)
        shutil.copytree(good, copy)
        edit(copy)
        with pytest.raises(CheckpointError) as exc:
            verify(copy)
        return str(exc.value)

    def truncate(d):
        with open(os.path.join(d, shard), "r+b") as f:
            f.truncate(meta["files"][shard]["bytes"] // 2)

    def flip(d):
        with open(os.path.join(d, shard), "r+b") as f:
            f.seek(meta["files"][shard]["bytes"] // 2)
            byte = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([byte[0] ^ 0xFF]))

    def newer(d):
        with open(os.path.join(d, META)) as f:
            m = json.load(f)
        m["format_version"] = 99
        with open(os.path.join(d, META), "w") as f:
            json.dump(m, f)

    assert "truncated" in broken("trunc", truncate)
    assert "does not match its checksum" in broken("flip", flip)
    assert "incomplete" in broken("nometa", lambda d: os.remove(os.path.join(d, META)))
    assert "newer than this" in broken("newer", newer)
    vocab = meta["layout"]["padded_vocab_size"]

    def refusal(*flags, vocab=vocab, dp=1):
        with pytest.raises(CheckpointError) as exc:
            verify(good, parse_config(["--config", TINY, *common, *flags]), vocab, dp)
        return str(exc.value)

    assert "hidden_size saved 64 vs now 32" in refusal("--hidden-size", "32")
    assert "padded_vocab_size saved" in refusal(vocab=vocab + 128)
    assert "saved with --pipeline-model-parallel-size 2" in refusal(
        "--pipeline-model-parallel-size", "1")
    # Resuming in another mode: the pipeline's weight versions, the replicas' own state,
    # the optimizer's learning-rate groups (Megatron's loader would stop on a missing key).
    for flags, message in ((["--pipeline-schedule", "2bw"], "saved by a --pipeline-schedule "
                                                             "flush run"),
                           (["--dp-averaging", "sparse"], "saved by a --dp-averaging none run"),
                           (["--decoupled-lr", "2e-3"], "Resume without --decoupled-lr")):
        res = train(str(tmp_path / "other"), 2, [*common, "--train-iters", "8", "--load", ckpt,
                                                 *flags], check=False)
        assert res.returncode != 0 and message in res.output, res.tail()


def test_kill_a_rank_in_the_middle_of_a_save(tmp_path, data_args):
    """SIGKILL on rank 1 after it wrote its shards of step 8 and before the save was
    sealed: the job ends (no hang), nothing claims step 8 is complete, and a new run
    resumes from step 4 and reproduces the killed run's steps 5-8."""
    ckpt = str(tmp_path / "ckpt")
    args = [*data_args, "--train-iters", "8", "--lr-warmup-iters", "1", "--eval-iters", "0",
            "--save", ckpt, "--save-interval", "4"]
    killed = str(tmp_path / "killed")
    res = launch(["-m", "megatron_asyncmesh.train", "--config", TINY, "--run-dir", killed,
        "--no-progress", *args], nproc=2, check=False, timeout=240,
        env={"ASYNCMESH_CRASH": "after_shards:1:8", "ASYNCMESH_DIST_TIMEOUT": "30"})
    assert res.returncode != 0 and not res.timed_out
    assert open(os.path.join(ckpt, "latest_checkpointed_iteration.txt")).read() == "4"
    assert "iter_0000008" not in os.listdir(ckpt)         # at most iter_0000008.partial
    resumed = str(tmp_path / "resumed")
    train(resumed, 2, [*args, "--load", ckpt])
    before = {r["step"]: r["loss"] for r in read_metrics(killed)[0]}
    after = {r["step"]: r["loss"] for r in read_metrics(resumed)[0]}
    assert sorted(after) == [5, 6, 7, 8]
    assert [after[s] for s in after] == [before[s] for s in after]


def test_legacy_checkpoint_continues(tmp_path):
    """A checkpoint written by an earlier version (tests/fixtures/legacy_mesh, made by
    make_legacy_checkpoint.py at the commit it names: the full mesh, PP = 2 x DP = 2,
    2bw + nadamw + error feedback + sparse ema averaging, saved at step 3) loads with
    this version and continues bitwise: steps 4-6 equal that version's own straight run,
    and so does the final validation loss, to float32 rounding: evaluation's forward-only
    kernels sum in an order that depends on the CPU (on an AMD EPYC with AVX-512
    6.799527526 against the fixture machine's 6.799527645, the training losses equal)."""
    fixture = os.path.join(os.path.dirname(__file__), "fixtures", "legacy_mesh")
    with open(os.path.join(fixture, "expected.json")) as f:
        expected = json.load(f)
    work = str(tmp_path / "legacy")
    shutil.copytree(fixture, work)
    prefix = os.path.join(work, "data", "corpus")
    run = str(tmp_path / "run")
    launch(["-m", "megatron_asyncmesh.train", *expected["args"], "--data-path", prefix,
            "--tokenizer-model", prefix + ".tokenizer.model", "--run-dir", run,
            "--load", os.path.join(work, "ckpt")], nproc=4)
    train_lines, val_lines = read_metrics(run)
    got = {str(r["step"]): r["loss"] for r in train_lines}
    assert sorted(got) == ["4", "5", "6"]
    assert got == {s: expected["losses"][s] for s in got}
    assert val_lines[-1]["val_loss"] == pytest.approx(expected["val_loss"], rel=1e-6, abs=0)
