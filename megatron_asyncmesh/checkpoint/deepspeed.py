"""DeepSpeed's own checkpoints of ``train_deepspeed`` runs: ``engine.save_checkpoint``
(tag ``global_step<N>``) plus this project's config beside it, the checks before a resume,
and ``--save-keep-last``. ``tools/convert_checkpoint.py zero-export`` consolidates them
(``checkpoint.convert``)."""

from __future__ import annotations

import json
import os
import shutil

import torch.distributed as dist

from megatron_asyncmesh.checkpoint.integrity import check_param_groups, check_same_model, \
    model_shape
from megatron_asyncmesh.config import config_from_dict
from megatron_asyncmesh.options import ConfigError

DS_CONFIG = "asyncmesh_config.json"    # beside a DeepSpeed checkpoint (train_deepspeed --save)


def save_zero_checkpoint(cfg, engine, zero_stage: int, padded_vocab: int,
                         step: int, dp: int) -> None:
    """DeepSpeed's own checkpoint (``engine.save_checkpoint``, tag ``global_step<N>``, its
    ``latest`` written last) plus the model config beside it (atomically):
    ``--load`` resumes from it, ``tools/convert_checkpoint.py zero-export``
    consolidates it with DeepSpeed's ``zero_to_fp32``. ``--save-keep-last K`` removes
    older tags once the new one is complete."""
    engine.save_checkpoint(cfg.save, tag=f"global_step{step}", client_state={"iteration": step})
    if dist.get_rank() == 0:
        tmp = os.path.join(cfg.save, DS_CONFIG + ".tmp")
        with open(tmp, "w") as f:
            json.dump({"config": cfg.to_dict(), "padded_vocab_size": padded_vocab,
                       "zero_stage": zero_stage, "data_parallel_size": dp,
                       "iteration": step}, f, indent=1)
        os.replace(tmp, os.path.join(cfg.save, DS_CONFIG))
        if cfg.save_keep_last:
            # Only tags up to this one: a higher one is a save that never completed
            # (``latest`` never named it), which this run's saves will overwrite.
            done = [s for s in saved_steps(cfg.save) if s <= step]
            for old in done[:-cfg.save_keep_last]:
                shutil.rmtree(os.path.join(cfg.save, f"global_step{old}"), ignore_errors=True)
    dist.barrier()


def saved_steps(directory: str) -> list:
    return sorted(int(n[len("global_step"):]) for n in os.listdir(directory)
                  if n.startswith("global_step") and n[len("global_step"):].isdigit())


def check_zero_resume(cfg, zero_stage: int, padded_vocab: int, dp: int) -> int:
    """Before DeepSpeed reads a byte: ``--load`` is a complete ``train_deepspeed --save``
    of the same model, ZeRO stage and data-parallel size. Returns its iteration."""
    config_path = os.path.join(cfg.load, DS_CONFIG)
    latest = os.path.join(cfg.load, "latest")
    if not (os.path.isfile(config_path) and os.path.isfile(latest)):
        raise ConfigError(
            f"--load {cfg.load!r}: no {DS_CONFIG} and DeepSpeed 'latest' file there, so it is "
            f"not a complete train_deepspeed --save directory (checkpoints of "
            f"asyncmesh-train resume with asyncmesh-train).")
    with open(config_path) as f:
        saved = json.load(f)
    with open(latest) as f:
        tag = f.read().strip()
    if tag != f"global_step{saved['iteration']}" or \
            not os.path.isdir(os.path.join(cfg.load, tag)):
        raise ConfigError(
            f"--load {cfg.load!r}: DeepSpeed's latest tag {tag!r} and {DS_CONFIG}'s iteration "
            f"{saved['iteration']} disagree, or the tag directory is missing (a save was "
            f"interrupted or files were removed).")
    saved_cfg = config_from_dict(saved["config"])
    check_same_model(f"--load {cfg.load!r}", model_shape(saved_cfg, saved["padded_vocab_size"]),
                     cfg, padded_vocab)
    check_param_groups(f"--load {cfg.load!r}", cfg, saved_cfg, saved["iteration"])
    if saved["zero_stage"] != zero_stage or saved.get("data_parallel_size", dp) != dp:
        raise ConfigError(
            f"--load {cfg.load!r} was saved with --zero-stage {saved['zero_stage']} on "
            f"{saved.get('data_parallel_size')} data-parallel ranks; this run has "
            f"--zero-stage {zero_stage} on {dp}. Resume with the same ZeRO stage and number "
            f"of ranks, or export it (tools/convert_checkpoint.py zero-export, then "
            f"hf-import) to start a new run from its weights.")
    if saved["iteration"] >= cfg.train_iters:
        raise ConfigError(f"--load {cfg.load!r} is at iteration {saved['iteration']}, not "
                          f"before --train-iters {cfg.train_iters}: nothing to train.")
    return saved["iteration"]
