"""Tensor parallelism (``--tensor-model-parallel-size``) under the asynchronous pipeline:
exact initial weights, the same training as TP = 1, resume, the layout seal, the
converter to TP = 1 and the Hugging Face export from TP = 2."""

import os

import pytest

from megatron_asyncmesh.config import parse_config
from megatron_asyncmesh.options import ConfigError
from tests.harness import REPO, evaluate, read_metrics, tool, train

TINY = os.path.join(REPO, "launch", "configs", "tiny.yaml")
STEPS = 12
BASE = ["--train-iters", str(STEPS), "--eval-interval", "6", "--pipeline-model-parallel-size",
        "2", "--untie-embeddings-and-output-weights", "--lr-warmup-iters", "2"]


def _train_losses(run_dir):
    rows, vals = read_metrics(run_dir)
    return [r["loss"] for r in rows], [v["val_loss"] for v in vals]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_data):
    """TP = 1 and TP = 2 at PP = 2 under 2bw (the TP = 2 run checkpoints at 6 and 12),
    and TP = 2 under Megatron's flush schedule."""
    root = tmp_path_factory.mktemp("tp")
    data = ["--data-path", tiny_data["data_path"], "--tokenizer-model",
            tiny_data["tokenizer_model"]]
    out = {"data": data, "root": root}
    for name, nproc, extra in (
            ("tp1_2bw", 2, ["--pipeline-schedule", "2bw"]),
            ("tp2_2bw", 4, ["--pipeline-schedule", "2bw", "--tensor-model-parallel-size", "2",
                            "--save", str(root / "ckpt"), "--save-interval", "6"]),
            ("tp1_flush", 2, []),
            ("tp2_flush", 4, ["--tensor-model-parallel-size", "2"])):
        run_dir = str(root / name)
        train(run_dir, nproc=nproc, args=[*BASE, *extra, *data])
        out[name] = run_dir
    return out


@pytest.mark.parametrize("schedule", ["2bw", "flush"])
def test_tp2_trains_as_tp1(runs, schedule):
    """The TP = 2 model starts from exactly the TP = 1 weights (every rank draws the whole
    tensor and keeps its shard), so the two runs differ only by the order of fp32 sums
    (row-parallel all-reduces, the vocabulary-parallel softmax): per-step losses agree to
    1e-5 relative, about 100 fp32 roundings (measured: 2e-8). A layout-dependent
    initialisation would differ from step 0 by ~1e-3."""
    tp1, tp2 = (_train_losses(runs[f"tp{t}_{schedule}"]) for t in (1, 2))
    assert len(tp1[0]) == len(tp2[0]) == STEPS and len(tp1[1]) == len(tp2[1]) == 3
    for a, b in zip(tp1[0] + tp1[1], tp2[0] + tp2[1]):
        assert abs(a - b) <= 1e-5 * abs(a), (tp1, tp2)
    assert tp2[0][-1] < tp2[0][0]


def test_tp2_resumes_bitwise(runs, tmp_path):
    ckpt = str(runs["root"] / "ckpt")
    with open(os.path.join(ckpt, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("6")
    run_dir = str(tmp_path / "resumed")
    train(run_dir, nproc=4, args=[*BASE, "--pipeline-schedule", "2bw",
                                  "--tensor-model-parallel-size", "2", "--load", ckpt,
                                  *runs["data"]])
    full, resumed = read_metrics(runs["tp2_2bw"]), read_metrics(run_dir)
    assert [(r["step"], r["loss"]) for r in full[0] if r["step"] > 6] == \
        [(r["step"], r["loss"]) for r in resumed[0]]
    assert full[1][-1]["val_loss"] == resumed[1][-1]["val_loss"]
    with open(os.path.join(ckpt, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write(str(STEPS))


def test_tp2_checkpoint_at_tp1_is_refused_and_converts(runs, tmp_path):
    """Loading the TP = 2 checkpoint at TP = 1 is refused with the conversion command;
    converted to TP = 1 (reshard) it evaluates to the run's own final validation loss,
    and so does its Hugging Face export from TP = 2."""
    ckpt = str(runs["root"] / "ckpt")
    res = train(str(tmp_path / "refused"), nproc=2, check=False,
                args=[*BASE, "--pipeline-schedule", "2bw", "--load", ckpt, *runs["data"]])
    assert res.returncode != 0
    assert "was saved with --tensor-model-parallel-size 2, this run has 1" in res.output
    assert "--tensor-model-parallel-size 1" in res.output
    final = read_metrics(runs["tp2_2bw"])[1][-1]["val_loss"]
    tp1, hf = str(tmp_path / "tp1"), str(tmp_path / "hf")
    tool("convert_checkpoint.py", "reshard", "--input", ckpt, "--output", tp1,
         "--tensor-model-parallel-size", "1", "--drop-async-state")
    tool("convert_checkpoint.py", "hf-export", "--input", ckpt, "--output", hf)
    for source in (["--checkpoint", tp1], ["--hf", hf]):
        assert evaluate(*source, *runs["data"])["val_loss"] == pytest.approx(final, rel=1e-6)


def test_tp_must_divide_heads_and_mlp():
    with pytest.raises(ConfigError, match="does not divide --num-attention-heads 4"):
        parse_config(["--config", TINY, "--tensor-model-parallel-size", "3"])
    cfg = parse_config(["--config", TINY, "--tensor-model-parallel-size", "2"])
    with pytest.raises(ConfigError, match="PP x TP x DP"):
        cfg.validate_world(3)
    assert cfg.validate_world(4) == 2
