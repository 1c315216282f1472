"""tools/gpu_check.py runs its whole path on the CPU (--dry-run), so it cannot rot
between the sessions that have a GPU to run it on."""

import json
import os
import subprocess

from tests.harness import REPO, env_for_ranks, python_cmd


def test_gpu_check_dry_run(tmp_path, tiny_data):
    out = str(tmp_path / "gpu_check")
    proc = subprocess.run(
        python_cmd(os.path.join(REPO, "tools", "gpu_check.py"), "--dry-run", "--out", out,
                   "--data-path", tiny_data["data_path"], "--tokenizer-model",
                   tiny_data["tokenizer_model"]),
        capture_output=True, text=True, env=env_for_ranks(), cwd=REPO, timeout=500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(os.path.join(out, "results.json")) as f:
        r = json.load(f)
    assert set(r["training"]) == {"flush", "2bw", "stash"}
    for mode, t in r["training"].items():
        assert t["ms_per_step"] > 0 and t["tokens_per_s"] > 0, mode
    assert r["training"]["2bw"]["weight_copies"] == 2          # PP = 1: 2bw still delays
    assert r["training"]["2bw"]["device_synchronizations_in_steps"] == 0
    assert {"adamw", "nadamw", "muon"} <= set(r["optimizer_step"]["methods"])
    assert r["averager"][0]["selector_builds"] == r["averager"][0]["cycles_started"]
    assert os.path.getsize(os.path.join(out, "results.md")) > 200
