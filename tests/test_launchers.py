"""The training entry point runs 2-rank jobs under each supported launcher."""

import pytest

from tests.harness import read_summary, train


# The other tests start their ranks with tests/fork_launcher.py (torchrun's environment,
# one warm parent); the deepspeed launcher runs the PP x DP mesh in
# tests/test_checkpoint.py, and torchrun and mpirun run here.
@pytest.mark.parametrize("launcher,expected", [("torchrun", "env"), ("mpirun", "mpi")])
def test_two_rank_job(tmp_path, data_args, launcher, expected):
    run_dir = str(tmp_path)
    train(run_dir, 2, [*data_args, "--train-iters", "4", "--lr-warmup-iters", "1",
                       "--eval-interval", "4", "--eval-iters", "1",
                       "--pipeline-model-parallel-size", "2"], launcher=launcher, timeout=240)
    summary = read_summary(run_dir)
    assert summary["world_size"] == 2
    assert summary["launcher"] == expected
    assert summary["final_val_loss"] is not None
    assert len(summary["peak_rss_mb"]) == 2
