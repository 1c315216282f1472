"""The default demo trains synchronous Megatron and the asynchronous mesh on the same
tokens and compares them in one table and one plot (a small model, a few steps)."""

import json
import os

from tests.harness import launch

SMALL = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "2",
         "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "8",
         "--train-iters", "4", "--lr-warmup-iters", "1", "--eval-interval", "2", "--eval-iters", "1",
         "--dp-fraction", "0.5", "--dp-delay", "1", "--no-progress"]


def test_demo_compares_sync_and_mesh(tmp_path, tiny_data):
    root = str(tmp_path / "demo")
    launch(["-m", "megatron_asyncmesh.demo", "--run-dir", root,
            "--data-path", tiny_data["data_path"],
            "--tokenizer-model", tiny_data["tokenizer_model"], *SMALL],
           nproc=1, launcher="python", timeout=600)
    with open(os.path.join(root, "comparison.json")) as f:
        rows = json.load(f)
    assert list(rows) == ["sync", "mesh"]
    sync, mesh = rows["sync"], rows["mesh"]
    # The same recipe, the one the README names: only the two synchronisations differ.
    assert (sync["pipeline_schedule"], sync["dp_averaging"]) == ("flush", "none")
    assert (mesh["pipeline_schedule"], mesh["dp_averaging"]) == ("stash", "sparse")
    assert sync["optimizer"] == mesh["optimizer"] == "muon"
    assert mesh["consensus_val_loss"] is not None and sync["consensus_val_loss"] is None
    # Half of every tensor per step against every gradient: fewer bytes on the data axis,
    # the same activations on the pipeline axis.
    assert 0 < mesh["dp_bytes_per_step"] < sync["dp_bytes_per_step"]
    assert mesh["pp_bytes_per_step"] == sync["pp_bytes_per_step"] == 2 * 2 * 32 * 2 * 32 * 4
    for r in rows.values():
        assert [v["step"] for v in r["val_loss_history"]] == [0, 2, 4]
    table = open(os.path.join(root, "comparison.md")).read()
    assert "consensus val loss" in table and table.count("\n") == 4
    assert os.path.getsize(os.path.join(root, "comparison.png")) > 1000

