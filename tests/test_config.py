"""Configuration: YAML + flags, and every bad layout gets a clear error."""

import pytest

from megatron_asyncmesh.config import ConfigError, TrainConfig, parse_config
from tests.harness import TINY


def test_yaml_then_command_line(tmp_path):
    cfg = parse_config(["--config", TINY, "--hidden-size", "32", "--no-progress"])
    assert cfg.num_layers == 4 and cfg.hidden_size == 32 and cfg.progress is False
    assert cfg.lr == pytest.approx(1e-3)


def test_unknown_yaml_key_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("num_layers: 2\nhiden_size: 64\n")
    with pytest.raises(ConfigError, match=r"unknown keys: 'hiden_size' \(did you mean 'hidden_size'\?\)"):
        parse_config(["--config", str(path)])


def test_yaml_type_errors(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("num_layers: four\n")
    with pytest.raises(ConfigError, match="num_layers: expected int, got 'four'"):
        parse_config(["--config", str(path)])


def test_layers_not_divisible_by_pipeline():
    with pytest.raises(ConfigError, match=r"--num-layers 5 is not divisible by "
                                          r"--pipeline-model-parallel-size 2"):
        parse_config(["--num-layers", "5", "--pipeline-model-parallel-size", "2"])


def test_world_size_must_be_pp_times_dp():
    cfg = TrainConfig(pipeline_model_parallel_size=2, data_parallel_size=2)
    with pytest.raises(ConfigError, match=r"world size 2 != PP x TP x DP = 2 x 1 x 2 = 4"):
        cfg.validate_world(2)
    with pytest.raises(ConfigError, match="world size 3 is not divisible"):
        TrainConfig(pipeline_model_parallel_size=2).validate_world(3)
    assert TrainConfig(pipeline_model_parallel_size=2).validate_world(4) == 2


def test_global_batch_divisibility():
    cfg = TrainConfig(micro_batch_size=4, global_batch_size=12)
    with pytest.raises(ConfigError, match=r"--global-batch-size 12 is not divisible by "
                                          r"--micro-batch-size x DP = 4 x 2 = 8"):
        cfg.validate_world(2)
    assert cfg.num_microbatches(cfg.validate_world(1)) == 3


def test_warmup_longer_than_decay():
    with pytest.raises(ConfigError, match="--lr-warmup-iters 50 must be smaller"):
        parse_config(["--train-iters", "10", "--lr-warmup-iters", "50"])


def test_choices_and_positive_values():
    with pytest.raises(SystemExit):  # argparse rejects the choice itself
        parse_config(["--lr-decay-style", "exp"])
    with pytest.raises(ConfigError, match="--micro-batch-size must be a positive integer"):
        parse_config(["--micro-batch-size", "0"])


def test_bad_layout_from_the_entry_point(tmp_path, data_args):
    """A launched job with the wrong world size stops every rank with the message."""
    from tests.harness import train

    res = train(str(tmp_path), 2, [*data_args, "--data-parallel-size", "4"], check=False,
                timeout=120)
    assert res.returncode != 0 and not res.timed_out
    assert "world size 2 != PP x TP x DP = 1 x 1 x 4 = 4" in res.output


def test_named_configs_are_valid():
    import glob
    import os

    from tests.harness import REPO

    paths = sorted(glob.glob(os.path.join(REPO, "launch", "configs", "*.yaml")))
    names = {os.path.basename(p) for p in paths}
    assert {"tiny.yaml", "demo.yaml", "gpt-125m.yaml", "gpt-350m.yaml", "gpt-760m.yaml",
            "gpt-1.3b.yaml"} <= names
    shapes = {}
    for path in paths:
        cfg = parse_config(["--config", path])
        shapes[os.path.basename(path)] = (cfg.num_layers, cfg.hidden_size,
                                          cfg.num_attention_heads, cfg.seq_length)
    # GPT-3 paper, Table 2.1 (1.3B: 16 heads keep its d_head = 128; the table's 24 heads
    # do not divide d_model = 2048).
    assert shapes["gpt-125m.yaml"] == (12, 768, 12, 2048)
    assert shapes["gpt-350m.yaml"] == (24, 1024, 16, 2048)
    assert shapes["gpt-760m.yaml"] == (24, 1536, 16, 2048)
    assert shapes["gpt-1.3b.yaml"] == (24, 2048, 16, 2048)
