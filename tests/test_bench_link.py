"""tools/bench_link.py's arithmetic (time to target, loss at equal time) and its refusal
without root; the runs themselves need root and minutes, and are measured by hand
(README, "Time to target across slow links")."""

import importlib.util
import os

import pytest

from tests.harness import REPO


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location(
        "bench_link", os.path.join(REPO, "tools", "bench_link.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_time_to_target_interpolates_between_evaluations(bench):
    pts = [(0.0, 0, 8.0), (10.0, 10, 6.0), (20.0, 20, 5.0), (30.0, 30, 4.0)]
    assert bench.time_to(pts, 8.0) == 0.0
    assert bench.time_to(pts, 6.0) == 10.0
    assert bench.time_to(pts, 4.5) == pytest.approx(25.0)
    assert bench.time_to(pts, 3.9) is None
    # A loss that dips below the target and rises again counts from the first crossing.
    assert bench.time_to([(0, 0, 5.0), (4, 4, 3.0), (8, 8, 6.0)], 4.0) == pytest.approx(2.0)
    assert bench.loss_at(pts, 15.0) == pytest.approx(5.5)
    assert bench.loss_at(pts, 31.0) is None


def test_report_measures_against_the_sync_run(bench, tmp_path):
    def run(points, iters):
        return {"curve": points, "train_iters": iters, "final_loss": points[-1][2],
                "train_seconds": points[-1][0], "tokens_per_s": 100.0}

    results = {"100mbit": {
        "sync": run([(0.0, 0, 8.0), (100.0, 10, 5.0)], 10),
        "mesh": run([(0.0, 0, 8.0), (20.0, 10, 6.0), (40.0, 20, 4.0)], 20),
        "zero1": run([(0.0, 0, 8.0), (200.0, 10, 6.0)], 10)}}
    text = bench.report(str(tmp_path), results)
    mesh, zero1 = results["100mbit"]["mesh"], results["100mbit"]["zero1"]
    assert mesh["seconds_to_target"] == pytest.approx(30.0)
    assert "| 100mbit | mesh | 20 | 4.0000 | 30 | 3.33x |" in text
    assert zero1["seconds_to_target"] is None
    assert zero1["loss_at_sync_finish"] == pytest.approx(7.0)
    assert mesh["loss_at_sync_finish"] is None           # it finished before
    assert os.path.exists(tmp_path / "time_to_target-rank.png")


def test_without_root_it_says_why(bench, monkeypatch, capsys):
    monkeypatch.setattr(bench, "unavailable", lambda: "not root: needs root")
    assert bench.main(["--out", "/nonexistent/never-made"]) == 77
    assert "not root" in capsys.readouterr().out


def test_model_flags_reach_every_run_and_the_report(bench, tmp_path):
    """--model-flags: the same model and tokens in all three runs (after mesh.yaml, so
    they override it), named in the table's heading."""
    flags = ["--micro-batch-size", "1", "--global-batch-size", "8"]
    for name in ("sync", "mesh", "zero1"):
        _, args = bench.run_spec(name, 10, 2.0, 2e-3, flags)
        at = args.index("--micro-batch-size")
        assert args[at:at + 4] == flags and args.index("--config") < at, name
    results = {"100mbit": {"sync": {"curve": [(0.0, 0, 8.0), (10.0, 10, 5.0)],
                                    "train_iters": 10, "final_loss": 5.0,
                                    "train_seconds": 10.0, "tokens_per_s": 1.0}}}
    text = bench.report(str(tmp_path), results, model_flags=" ".join(flags))
    assert "mesh.yaml with `--micro-batch-size 1 --global-batch-size 8`" in text
