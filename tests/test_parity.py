"""Parity of layouts: PP = 1, PP = 2 and PP = 2 x DP = 2 train the same model.

Same seed, same data, same global batch, 20 steps. The initial weights are
identical by construction (layout-independent init), the samples of each
step are the same (Megatron's sampler order), so only the order of float32
reductions differs: the pipeline split changes nothing in the arithmetic of
a layer, while DP = 2 averages gradients in a different order and the
distributed optimizer updates shards. Observed differences are ~3e-7; the
tolerance 2e-5 (absolute, on losses ~7-8) leaves room for BLAS differences
across machines while still catching any real semantic change (a dropped
microbatch or a wrong gradient scale moves the loss by >1e-3 within a few
steps).
"""

import pytest

from tests.harness import read_metrics, read_summary, train

STEPS = ["--train-iters", "20", "--eval-interval", "10", "--eval-iters", "2"]


def _losses(run_dir):
    train_recs, val_recs = read_metrics(run_dir)
    return [r["loss"] for r in train_recs], [r["val_loss"] for r in val_recs]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_data):
    run_dir = str(tmp_path_factory.mktemp("pp1"))
    train(run_dir, 1, ["--data-path", tiny_data["data_path"], "--tokenizer-model",
                       tiny_data["tokenizer_model"], *STEPS])
    return _losses(run_dir)


@pytest.mark.parametrize("nproc,pp,extra", [
    (2, 2, []),
    (4, 2, ["--use-distributed-optimizer"]),
], ids=["pp2", "pp2xdp2-distopt"])
def test_layouts_match_single_process(tmp_path, data_args, reference, nproc, pp, extra):
    run_dir = str(tmp_path)
    train(run_dir, nproc, [*data_args, *STEPS, "--pipeline-model-parallel-size", str(pp), *extra])
    losses, val = _losses(run_dir)
    ref_losses, ref_val = reference
    assert len(losses) == len(ref_losses) == 20
    assert losses == pytest.approx(ref_losses, abs=2e-5)
    assert val == pytest.approx(ref_val, abs=2e-5)
    summary = read_summary(run_dir)
    assert summary["pipeline_model_parallel_size"] == pp
    assert summary["data_parallel_size"] == nproc // pp
    # torchrun's environment (the fork launcher; torchrun, mpirun and deepspeed themselves:
    # tests/test_launchers.py, tests/test_checkpoint.py's mesh)
    assert summary["launcher"] == "env"
    # Megatron's own 1F1B (flush) recorded on the timeline: no delay, stages idle part
    # of the time (the bubble).
    assert summary["pipeline_schedule"] == "flush"
    assert summary["stage_delay"]["0"]["max"] == 0
    assert all(0.0 < u < 1.0 for u in summary["stage_utilization"].values())
    # Learning happened (the parity is not between two frozen models).
    assert ref_val[-1] < ref_val[0] - 0.3
