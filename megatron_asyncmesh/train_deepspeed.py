"""The same GPT and data on a DeepSpeed engine: ZeRO baselines and AsyncMesh for DeepSpeed.

The model is the Megatron-core ``GPTModel`` of ``megatron_asyncmesh.train``
(PP = 1, same layout-independent initialisation), the data the same
``GPTDataset`` samples in the same order, the optimizer torch's AdamW with
Megatron's parameter groups (no weight decay on biases and norms) and
Megatron's warm-up + cosine schedule. ``deepspeed.initialize`` builds the
engine; ZeRO is DeepSpeed's own::

    deepspeed --num_gpus 2 --module megatron_asyncmesh.train_deepspeed \\
        --config launch/configs/tiny.yaml --zero-stage 1            # ZeRO-1 baseline
    deepspeed --num_gpus 2 --module megatron_asyncmesh.train_deepspeed \\
        --config launch/configs/tiny.yaml --zero-stage 1 --dp-averaging sparse

With ``--dp-averaging sparse`` the engine gets ``mpu=ReplicaMPU()`` and
:func:`attach_sparse_averaging` (ZeRO stage 0 or 1). Every collective
DeepSpeed issues goes through ``deepspeed.comm``, whose comms logger counts
the bytes; ``summary.json`` reports them per step. ``--save`` / ``--load`` use
DeepSpeed's own checkpoints (see :func:`save_zero_checkpoint`).
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Optional, Sequence

import megatron_asyncmesh  # noqa: F401  (CPU compatibility layer first)
from megatron_asyncmesh.config import ConfigError, TrainConfig, parse_config

# Collectives ZeRO 1/2/3 and the averager issue. deepspeed 0.19.8's comms logger exits
# the process on ops its bandwidth table lacks, so only these are profiled.
LOGGED_OPS = ["all_reduce", "all_reduce_coalesced", "reduce_scatter", "reduce_scatter_tensor",
              "all_gather", "all_gather_into_tensor", "broadcast", "reduce",
              "all_to_all_single"]


def megatron_lr(cfg: TrainConfig, step: int) -> float:
    """Megatron's OptimizerParamScheduler (linear warm-up from 0, then cosine/linear
    decay to min_lr) as a function of completed optimizer steps."""
    warmup, decay = cfg.lr_warmup_iters, cfg.lr_decay_iters or cfg.train_iters
    if warmup > 0 and step <= warmup:
        return cfg.lr * step / warmup
    if cfg.lr_decay_style == "constant":
        return cfg.lr
    if step > decay:
        return cfg.min_lr
    ratio = (step - warmup) / max(1, decay - warmup)
    coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0) if cfg.lr_decay_style == "cosine" \
        else 1.0 - ratio
    return cfg.min_lr + coeff * (cfg.lr - cfg.min_lr)


def param_groups(model, weight_decay: float):
    """Megatron's default: no weight decay on biases and 1-d parameters."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if name.endswith(".bias") or p.dim() == 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def ds_config(cfg: TrainConfig, zero_stage: int, num_microbatches: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": num_microbatches,
        "gradient_clipping": cfg.clip_grad,
        "zero_optimization": {"stage": zero_stage},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": cfg.bf16},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }


def comm_bytes() -> dict:
    """Bytes per collective so far, as deepspeed's comms logger recorded them."""
    import deepspeed.comm as dscomm

    return {op: sum(size * rec[0] for size, rec in sizes.items())
            for op, sizes in dscomm.comms_logger.comms_dict.items()}


def save_zero_checkpoint(cfg: TrainConfig, engine, zero_stage: int, padded_vocab: int,
                         step: int, dp: int) -> None:
    """DeepSpeed's own checkpoint (``engine.save_checkpoint``, tag ``global_step<N>``, its
    ``latest`` written last) plus the model config beside it (atomically):
    ``--load`` resumes from it, ``tools/convert_checkpoint.py zero-export``
    consolidates it with DeepSpeed's ``zero_to_fp32``. ``--save-keep-last K`` removes
    older tags once the new one is complete."""
    import json
    import shutil

    import torch.distributed as dist

    from megatron_asyncmesh.convert import DS_CONFIG

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


def check_zero_resume(cfg: TrainConfig, zero_stage: int, padded_vocab: int, dp: int) -> int:
    """Before DeepSpeed reads a byte: ``--load`` is a complete ``train_deepspeed --save``
    of the same model, ZeRO stage and data-parallel size. Returns its iteration."""
    import json

    from megatron_asyncmesh.checkpoint import check_same_model, model_shape
    from megatron_asyncmesh.convert import DS_CONFIG, config_from_dict

    config_path = os.path.join(cfg.load, DS_CONFIG)
    latest = os.path.join(cfg.load, "latest")
    if not (os.path.isfile(config_path) and os.path.isfile(latest)):
        raise ConfigError(
            f"--load {cfg.load!r}: no {DS_CONFIG} and DeepSpeed 'latest' file there, so it is "
            f"not a complete train_deepspeed --save directory (checkpoints of "
            f"megatron_asyncmesh.train resume with megatron_asyncmesh.train).")
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
    check_same_model(f"--load {cfg.load!r}", model_shape(config_from_dict(saved["config"]),
                                                         saved["padded_vocab_size"]),
                     cfg, padded_vocab)
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


def run(cfg: TrainConfig, zero_stage: int) -> dict:
    import deepspeed
    import deepspeed.comm as dscomm
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_asyncmesh import distributed as mdist
    from megatron_asyncmesh.data.datasets import eval_microbatches, train_iterator
    from megatron_asyncmesh.dataparallel.deepspeed_hook import ReplicaMPU, \
        attach_sparse_averaging
    from megatron_asyncmesh.dataparallel.megatron import averaging_config
    from megatron_asyncmesh.metrics import RunWriter, final_table, peak_rss_mb, plot_losses
    from megatron_asyncmesh.model import build_gpt_stage, global_parameter_names, \
        init_layout_independent
    from megatron_asyncmesh.train import build_run_datasets, resolve_data

    if cfg.pipeline_model_parallel_size != 1:
        raise ConfigError(
            f"train_deepspeed runs data parallelism only (--pipeline-model-parallel-size 1, "
            f"got {cfg.pipeline_model_parallel_size}); pipelines run with "
            f"megatron_asyncmesh.train.")
    if cfg.optimizer not in ("adam", "sgd"):
        raise ConfigError(
            f"train_deepspeed trains with torch's AdamW (--optimizer adam) or SGD "
            f"(--optimizer sgd), got --optimizer {cfg.optimizer}; the look-ahead optimizers "
            f"run with megatron_asyncmesh.train.")
    if zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"--zero-stage must be 0, 1, 2 or 3, got {zero_stage}.")
    acfg = averaging_config(cfg)
    if acfg is not None and zero_stage >= 2:
        raise ConfigError(
            f"--dp-averaging sparse cannot be combined with --zero-stage {zero_stage}: ZeRO-2 "
            f"reduce-scatters gradients from backward hooks and keeps a slice of each "
            f"gradient, ZeRO-3 a slice of each parameter, so there are no independent whole "
            f"replicas to average. Use --zero-stage 0 or 1.")
    if (cfg.save or cfg.load) and acfg is not None:
        raise ConfigError(
            f"train_deepspeed {'--save' if cfg.save else '--load'} with --dp-averaging sparse: "
            f"a DeepSpeed checkpoint holds one model for all data-parallel ranks, and sparse "
            f"replicas differ (each with its own pending averages). Save and resume sparse "
            f"runs with megatron_asyncmesh.train.")
    t_start = time.time()
    launcher = mdist.init_distributed()
    threads = mdist.set_cpu_threads(cfg)
    dp = mdist.init_model_parallel(cfg)
    dscomm.init_distributed(dist_backend=dist.get_backend(), verbose=False)
    dscomm.configure(enabled=True, prof_all=False, prof_ops=LOGGED_OPS, verbose=False)
    rank = dist.get_rank()
    num_microbatches = cfg.num_microbatches(dp)
    resolve_data(cfg)
    gb = cfg.global_batch_size
    data = build_run_datasets(cfg)
    model = build_gpt_stage(cfg, data.vocab_size)
    init_layout_independent(model, cfg)
    names = global_parameter_names(model)
    # A checkpoint that cannot resume here is refused before the engine is built.
    start_iter = check_zero_resume(cfg, zero_stage, model.vocab_size, dp) if cfg.load else 0
    if cfg.optimizer == "adam":
        optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr,
                                      betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)
    else:   # Megatron's SGD: L2 weight decay, momentum
        optimizer = torch.optim.SGD(param_groups(model, cfg.weight_decay), lr=cfg.lr,
                                    momentum=cfg.sgd_momentum)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: megatron_lr(cfg, step) / cfg.lr)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler,
        config=ds_config(cfg, zero_stage, num_microbatches),
        mpu=ReplicaMPU() if acfg is not None else None)
    averager = attach_sparse_averaging(engine, acfg, names=names) if acfg else None
    if cfg.load:
        # DeepSpeed restores the module, the (ZeRO-partitioned) optimizer state and the
        # lr scheduler; the data position follows from the iteration.
        path, client = engine.load_checkpoint(cfg.load)
        if path is None or (client or {}).get("iteration") != start_iter:
            raise ConfigError(f"--load {cfg.load!r}: DeepSpeed could not load iteration "
                              f"{start_iter} (got {path!r}).")
    dp_rank = parallel_state.get_data_parallel_rank()
    train_it = train_iterator(data.train, cfg.micro_batch_size, dp_rank, dp, num_microbatches,
                              consumed_samples=start_iter * gb)
    valid = eval_microbatches(data.valid, cfg.micro_batch_size, dp_rank, dp, num_microbatches,
                              cfg.eval_iters) if cfg.eval_iters else None
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")

    def loss_of(batch):
        out = engine(batch["tokens"].to(device), batch["position_ids"].to(device), None,
                     labels=batch["labels"].to(device))
        mask = batch["loss_mask"].to(device).float()
        return (out.float() * mask).sum() / mask.sum().clamp(min=1.0), mask.sum()

    def all_mean(values) -> list:
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()

    @torch.no_grad()
    def evaluate() -> float:
        engine.eval()
        total = [0.0, 0.0]
        for batch in valid or []:
            loss, n = loss_of(batch)
            total[0] += float(loss) * float(n)
            total[1] += float(n)
        engine.train()
        s, n = all_mean(total)
        return s / max(n, 1.0)

    writer = RunWriter(cfg.run_dir, cfg.train_iters, enabled=rank == 0, progress=cfg.progress,
                       start_step=start_iter)
    val_history, pending = [], []
    tokens_per_step = gb * cfg.seq_length
    train_time, timed = 0.0, 0
    bytes_after_first = None

    def log_val(step):
        if cfg.eval_iters:
            val = evaluate()
            val_history.append({"step": step, "val_loss": val})
            writer.log({"step": step, "val_loss": val})

    last_loss = None

    def flush():
        # One all-reduce for the steps since the last one (no per-step sync point).
        nonlocal pending, last_loss
        if pending:
            sums = all_mean([v for rec in pending for v in rec[1:3]])
            for i, (step, _, _, dt, lr) in enumerate(pending):
                last_loss = sums[2 * i] / max(sums[2 * i + 1], 1.0)
                writer.log({"step": step, "loss": last_loss,
                            "lr": lr, "step_time_s": dt,
                            "tokens_per_s": tokens_per_step / dt})
            pending = []

    if start_iter == 0:
        log_val(0)
    for step in range(start_iter + 1, cfg.train_iters + 1):
        t0 = time.perf_counter()
        loss_sum = tokens = 0.0
        lr = engine.get_lr()[0]
        for _ in range(num_microbatches):
            loss, n = loss_of(next(train_it))
            engine.backward(loss)
            engine.step()
            loss_sum += float(loss) * float(n)
            tokens += float(n)
        dt = time.perf_counter() - t0
        if step == start_iter + 1:
            bytes_after_first = sum(comm_bytes().values())
        else:
            train_time += dt
            timed += 1
        pending.append((step, loss_sum, tokens, dt, lr))
        if step % cfg.eval_interval == 0 or step == cfg.train_iters:
            flush()
            log_val(step)
        elif writer.enabled:
            writer.progress(step)
        if cfg.save and (step == cfg.train_iters or
                         (cfg.save_interval and step % cfg.save_interval == 0)):
            save_zero_checkpoint(cfg, engine, zero_stage, model.vocab_size, step, dp)
    writer.close()
    if averager is not None:
        averager.wait_in_flight()
    by_op = comm_bytes()
    total_bytes = sum(by_op.values())
    per_rank = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, {
        "comm_bytes_by_op": by_op, "comm_bytes_total": total_bytes,
        "comm_bytes_per_step": (total_bytes - bytes_after_first)
        / max(1, cfg.train_iters - start_iter - 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "dp_averaging_stats": averager.stats() if averager is not None else None})
    summary = {
        "engine": "deepspeed", "zero_stage": zero_stage, "dp_averaging": cfg.dp_averaging,
        "final_val_loss": val_history[-1]["val_loss"] if val_history else None,
        "val_loss_history": val_history, "final_train_loss": last_loss,
        "tokens_per_s": tokens_per_step * timed / train_time if train_time else None,
        "steady_tokens_per_s": tokens_per_step * timed / train_time if train_time else None,
        "train_iters": cfg.train_iters, "start_iteration": start_iter, "data_parallel_size": dp,
        "num_microbatches": num_microbatches, "per_rank": per_rank,
        "comm_bytes_per_step": [r["comm_bytes_per_step"] for r in per_rank],
        "dp_averaging_stats": [r["dp_averaging_stats"] for r in per_rank],
        "parameters": sum(p.numel() for p in model.parameters()),
        "world_size": dist.get_world_size(), "launcher": launcher,
        "threads_per_rank": threads, "wall_time_s": time.time() - t_start,
        "run_dir": os.path.abspath(cfg.run_dir), "config": cfg.to_dict(),
        "peak_rss_mb": [r["peak_rss_mb"] for r in per_rank],
        "pipeline_model_parallel_size": 1, "pipeline_schedule": "none",
        "optimizer": f"{cfg.optimizer} (torch, DeepSpeed engine)",
    }
    if rank == 0:
        writer.write_summary(summary)
        plot_losses(cfg.run_dir)
        print(final_table(summary), flush=True)
    mdist.shutdown()
    return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse

    from megatron_asyncmesh.dataparallel.averaging import AveragingError
    from megatron_asyncmesh.train import run_reporting_errors

    front = argparse.ArgumentParser(add_help=False)
    front.add_argument("--zero-stage", type=int, default=0,
                       help="DeepSpeed ZeRO stage 0-3 (sparse averaging: 0 or 1)")
    known, rest = front.parse_known_args(argv)
    return run_reporting_errors(lambda: run(parse_config(rest), known.zero_stage),
                                (AveragingError,))


if __name__ == "__main__":
    sys.exit(main())
