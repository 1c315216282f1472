"""The asynchronous schedules through the training entry point."""

import json
import os

import pytest

from tests.harness import TINY, read_summary, train

STEPS = ["--train-iters", "8", "--eval-interval", "4", "--eval-iters", "1", "--log-interval", "1"]


@pytest.mark.parametrize("mode", ["2bw", "stash"])
def test_entry_point_trains_and_reports(tmp_path, data_args, mode):
    run_dir = str(tmp_path)
    train(run_dir, 2, [*data_args, *STEPS, "--pipeline-model-parallel-size", "2",
                       "--pipeline-schedule", mode, "--untie-embeddings-and-output-weights"])
    s = read_summary(run_dir)
    assert s["pipeline_schedule"] == mode
    assert set(s["stage_utilization"]) == {"0", "1"}
    assert all(0.0 < u <= 1.0 for u in s["stage_utilization"].values())
    # Measured delays: 2bw is 1 after the first step; stash (P=2, M=4) delays
    # one microbatch in four at stage 0 and none at the last stage.
    if mode == "2bw":
        assert s["stage_delay"]["0"]["max"] == s["stage_delay"]["1"]["max"] == 1
    else:
        from megatron_asyncmesh.pipeline.schedule import gradient_delay

        expected = [gradient_delay("stash", 2, 0, 4, j) for j in range(8 * 4)]
        assert s["stage_delay"]["0"]["mean"] == pytest.approx(sum(expected) / len(expected))
        assert s["stage_delay"]["0"]["max"] == 1
        assert s["stage_delay"]["1"]["max"] == 0
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    assert [r["step"] for r in recs if "loss" in r] == list(range(1, 9))
    assert [r["step"] for r in recs if "val_loss" in r] == [0, 4, 8]
    vals = [r["val_loss"] for r in recs if "val_loss" in r]
    assert vals[-1] < vals[0]
    for r in range(2):
        with open(os.path.join(run_dir, "timeline", f"rank{r}.json")) as f:
            tl = json.load(f)
        kinds = {iv["kind"] for iv in tl["intervals"]}
        assert {"F", "B", "STEP", "COMM"} <= kinds
    assert os.path.getsize(os.path.join(run_dir, "timeline.png")) > 10_000


def test_too_few_microbatches_for_a_no_flush_pipeline(tmp_path, data_args):
    """Found by the schedule at start-up (it needs the layout): every rank stops."""
    res = train(str(tmp_path), 2, [*data_args, *STEPS, "--pipeline-model-parallel-size", "2",
                                   "--pipeline-schedule", "2bw",
                                   "--untie-embeddings-and-output-weights",
                                   "--global-batch-size", "2", "--micro-batch-size", "2"],
                check=False)
    assert res.returncode != 0 and not res.timed_out
    assert "M >= P" in res.output and "error:" in res.output


@pytest.mark.parametrize("args,message", [
    (["--pipeline-schedule", "2bw"], "--untie-embeddings-and-output-weights"),
    (["--pipeline-schedule", "sync"], "invalid choice: 'sync'"),
], ids=["tied", "unknown-mode"])
def test_bad_schedule_arguments(capsys, args, message):
    """Refused while parsing, before any process group exists."""
    from megatron_asyncmesh import train as entry

    try:
        code = entry.main(["--config", TINY, *STEPS, "--pipeline-model-parallel-size", "2",
                           *args])
    except SystemExit as exc:           # argparse's own refusal
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "error:" in err
