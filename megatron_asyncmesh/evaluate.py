"""Validation loss / perplexity of a project checkpoint or a Hugging Face model.

Both are evaluated on the same samples the training run evaluates on: the
first ``eval_iters x global_batch_size`` samples of the validation split that
Megatron-core's dataset builder makes from ``--data-path`` with the run's
seed, split and sequence length (``tools/evaluate.py``). A project checkpoint
of any pipeline size is evaluated unsplit in one process; a Hugging Face
directory through ``AutoModelForCausalLM`` (what any user of the exported
model runs). The loss is the token mean of Megatron's masked cross entropy
over the padded vocabulary, as in training.
"""

from __future__ import annotations

import json
import math
import os
from typing import Optional

import torch

from megatron_asyncmesh.checkpoint.convert import (
    build_model, load_model, read_checkpoint, single_process)
from megatron_asyncmesh.checkpoint.hf import PROJECT_CONFIG
from megatron_asyncmesh.config import TrainConfig, config_from_dict
from megatron_asyncmesh.data.datasets import build_run_datasets, eval_microbatches, resolve_data
from megatron_asyncmesh.options import ConfigError


def _validation_batches(cfg: TrainConfig):
    resolve_data(cfg)
    data = build_run_datasets(cfg)
    return data, eval_microbatches(data.valid, cfg.micro_batch_size, 0, 1,
                                   cfg.global_batch_size // cfg.micro_batch_size,
                                   cfg.eval_iters)


def _token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
        reduction="none").view(labels.shape)


@torch.no_grad()
def evaluate(checkpoint: Optional[str] = None, hf_dir: Optional[str] = None,
             overrides: Optional[dict] = None, replica: Optional[int] = None,
             logits_out: Optional[str] = None) -> dict:
    """``overrides``: evaluation settings (data_path, tokenizer_model, eval_iters,
    global_batch_size, micro_batch_size, seq_length, seed, split) over the ones the
    checkpoint was trained with. ``logits_out``: save the first microbatch's tokens
    and logits (for parity checks between formats)."""
    if (checkpoint is None) == (hf_dir is None):
        raise ConfigError("evaluate one model: --checkpoint DIR or --hf DIR.")
    meta = None
    if checkpoint is not None:
        directory, meta, cfg = read_checkpoint(checkpoint)
        padded = meta["layout"]["padded_vocab_size"]
    else:
        if not os.path.isfile(os.path.join(hf_dir, "config.json")):
            raise ConfigError(f"--hf {hf_dir!r}: no config.json, not a Hugging Face model.")
        saved = os.path.join(hf_dir, PROJECT_CONFIG)
        cfg = TrainConfig()
        if os.path.isfile(saved):
            with open(saved) as f:
                cfg = config_from_dict(json.load(f)["config"])
        padded = None
    values = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = set(values) - {f for f in cfg.to_dict()}
    if unknown:
        raise ConfigError(f"unknown evaluation settings {sorted(unknown)}.")
    for key, value in values.items():
        setattr(cfg, key, value)
    if cfg.eval_iters < 1:
        raise ConfigError(f"--eval-iters must be >= 1, got {cfg.eval_iters}.")
    if cfg.global_batch_size % cfg.micro_batch_size:
        raise ConfigError(f"--global-batch-size {cfg.global_batch_size} is not a multiple of "
                          f"--micro-batch-size {cfg.micro_batch_size}.")
    with single_process(cfg) as cfg1:
        data, batches = _validation_batches(cfg1)
        if checkpoint is not None:
            model = build_model(cfg1, padded)
            load_model(directory, meta, model, replica)

            def logits_of(batch):
                return model(batch["tokens"], batch["position_ids"], None)
        else:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
            padded = model.config.vocab_size

            def logits_of(batch):
                return model(input_ids=batch["tokens"],
                             position_ids=batch["position_ids"]).logits
        if padded < data.vocab_size:
            raise ConfigError(f"the model has {padded} vocabulary rows, the data's tokenizer "
                              f"{data.vocab_size}: evaluate with the model's own tokenizer.")
        loss_sum, tokens = 0.0, 0.0
        for i, batch in enumerate(batches):
            logits = logits_of(batch)
            if i == 0 and logits_out:
                torch.save({"tokens": batch["tokens"], "logits": logits.float()}, logits_out)
            losses = _token_losses(logits, batch["labels"])
            mask = batch["loss_mask"].float()
            loss_sum += float((losses * mask).sum())
            tokens += float(mask.sum())
    loss = loss_sum / tokens
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "tokens": int(tokens),
            "eval_iters": cfg.eval_iters, "global_batch_size": cfg.global_batch_size,
            "seq_length": cfg.seq_length, "data_path": cfg.data_path,
            "model": checkpoint or hf_dir, "format": "megatron-asyncmesh" if checkpoint
            else "huggingface", **({"iteration": meta["iteration"]} if meta else {})}
