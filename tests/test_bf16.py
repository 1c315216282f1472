"""bf16 end to end on the CPU: Megatron's mixed precision (Float16Module, fp32 main
parameters) tracks the fp32 run, resumes bitwise, exports to Hugging Face and evaluates
to the same validation loss."""

import math
import os
import shutil

import pytest

from tests.harness import evaluate, read_metrics, read_summary, tool, train

ARGS = ["--pipeline-model-parallel-size", "2", "--pipeline-schedule", "2bw",
        "--untie-embeddings-and-output-weights", "--optimizer", "nadamw",
        "--global-batch-size", "8", "--micro-batch-size", "2", "--train-iters", "20",
        "--eval-interval", "10", "--eval-iters", "2", "--lr-warmup-iters", "2"]


def test_bf16_tracks_fp32_resumes_bitwise_and_exports(tmp_path, data_args):
    """Tolerance: bf16 keeps 8 significant bits (unit roundoff 2^-9 = 0.2 %); every
    matmul input, activation and weight copy is rounded to it while the fp32 main
    parameters and the loss are fp32. Over 20 steps the per-step training losses
    (~6-7 nats) stay within 1.5 % of the fp32 run's (observed here: under 0.5 %), and the
    run must learn as much (validation loss down by > 0.3 in both). A wrong scale, a
    lost update or an unconverted parameter moves the loss by far more."""
    fp32, bf16, resumed = (str(tmp_path / n) for n in ("fp32", "bf16", "resumed"))
    ckpt = str(tmp_path / "ckpt")
    train(fp32, 2, [*data_args, *ARGS])
    train(bf16, 2, [*data_args, *ARGS, "--bf16", "--save", ckpt, "--save-interval", "10"])
    ref = [r["loss"] for r in read_metrics(fp32)[0]]
    got = [r["loss"] for r in read_metrics(bf16)[0]]
    assert len(ref) == len(got) == 20 and all(math.isfinite(x) for x in got)
    worst = max(abs(a - b) / a for a, b in zip(ref, got))
    assert worst < 0.015, (worst, ref, got)
    print(f"bf16 vs fp32: worst relative loss difference {worst:.5f}")
    assert ref != got                                   # it did run in bf16
    val_ref = [r["val_loss"] for r in read_metrics(fp32)[1]]
    val = [r["val_loss"] for r in read_metrics(bf16)[1]]
    assert val_ref[0] - val_ref[-1] > 0.3 and val[0] - val[-1] > 0.3

    # Resume at step 10 (the checkpoint holds bf16 weights, fp32 main parameters and
    # NAdam moments, and the previous version 2bw runs on): bitwise.
    resume = str(tmp_path / "resume")
    os.makedirs(resume)
    shutil.copytree(os.path.join(ckpt, "iter_0000010"), os.path.join(resume, "iter_0000010"))
    with open(os.path.join(resume, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("10")
    train(resumed, 2, [*data_args, *ARGS, "--bf16", "--load", resume])
    again = {r["step"]: r["loss"] for r in read_metrics(resumed)[0]}
    assert sorted(again) == list(range(11, 21))
    assert [again[s] for s in sorted(again)] == got[10:]

    # The export holds the bf16 weights (in fp32): the checkpoint evaluated by the
    # project's evaluator and the Hugging Face model agree, and both are the run's own
    # final validation loss up to bf16 rounding of the activations.
    hf = str(tmp_path / "hf")
    tool("convert_checkpoint.py", "hf-export", "--input", ckpt, "--output", hf)
    from_ckpt = evaluate("--checkpoint", ckpt)["val_loss"]
    from_hf = evaluate("--hf", hf)["val_loss"]
    assert from_hf == pytest.approx(from_ckpt, abs=1e-4)
    assert from_ckpt == pytest.approx(read_summary(bf16)["final_val_loss"], rel=0.01)
