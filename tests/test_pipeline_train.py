"""The asynchronous schedules through the training entry point: bad arguments."""

import pytest

from tests.harness import TINY, train

STEPS = ["--train-iters", "8", "--eval-interval", "4", "--eval-iters", "1", "--log-interval", "1"]


# Training through the entry point with each no-flush schedule (measured delays, the
# timeline, utilisation): tests/test_checkpoint.py's resume cases; flush: tests/test_parity.py.


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
