"""Training entry point (``asyncmesh-train``): Megatron-core GPT, PP x DP, CPU or GPU.

Single process (PP = DP = 1)::

    asyncmesh-train --config launch/configs/tiny.yaml

Four CPU ranks, PP = 2 x DP = 2, with each launcher::

    torchrun --nproc_per_node 4 -m megatron_asyncmesh.train --config launch/configs/demo.yaml
    deepspeed --num_gpus 4 --module megatron_asyncmesh.train --config launch/configs/demo.yaml
    mpirun -np 4 python -m megatron_asyncmesh.train --config launch/configs/demo.yaml

Multi-node: see ``launch/README.md``. Flags follow Megatron-LM
(``--num-layers --hidden-size ... --pipeline-model-parallel-size``); with no
``--data-path`` the bundled corpus is prepared (once) and used. Outputs go to
``--run-dir``: ``metrics.jsonl``, ``summary.json``, ``tensorboard/``.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Optional, Sequence

import megatron_asyncmesh  # noqa: F401  (CPU compatibility layer before Megatron)
from megatron_asyncmesh.config import ConfigError, TrainConfig, parse_config
from megatron_asyncmesh.data.indexed import DatasetError


def _is_rank0() -> bool:
    import torch.distributed as dist

    if dist.is_initialized():
        return dist.get_rank() == 0
    return os.environ.get("RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0")) == "0"


def resolve_data(cfg: TrainConfig) -> None:
    """Fill in --data-path (bundled corpus) and --tokenizer-model defaults."""
    import json

    import torch.distributed as dist

    from megatron_asyncmesh.data.preprocess import ensure_bundled, tokenizer_path_for

    if cfg.data_path is None:
        # Rank 0 prepares the bundled corpus once; the others wait for it.
        error = None
        if dist.get_rank() == 0:
            try:
                cfg.data_path = ensure_bundled()
            except Exception as exc:  # broadcast, so every rank stops together
                error = f"could not prepare the bundled corpus: {exc}"
        box = [cfg.data_path, error]
        dist.broadcast_object_list(box, src=0)
        cfg.data_path, error = box
        if error:
            raise DatasetError(error)
    if cfg.tokenizer_model is None:
        candidate = tokenizer_path_for(cfg.data_path)
        meta_path = cfg.data_path + ".meta.json"
        if not os.path.isfile(candidate) and os.path.isfile(meta_path):
            with open(meta_path) as f:
                candidate = json.load(f).get("tokenizer_model", candidate)
        if not os.path.isfile(candidate):
            raise DatasetError(
                f"no tokenizer found for --data-path {cfg.data_path!r} (looked for "
                f"{candidate!r}); pass --tokenizer-model.")
        cfg.tokenizer_model = candidate


def build_run_datasets(cfg: TrainConfig, needs_data: bool = True):
    """The run's train / valid GPTDatasets, as every entry point builds them (after
    :func:`resolve_data`; collective). ``tools/evaluate.py`` relies on getting the same
    validation samples as training."""
    from megatron_asyncmesh.data.datasets import build_gpt_datasets

    gb = cfg.global_batch_size
    return build_gpt_datasets(
        cfg.data_path, cfg.tokenizer_model, cfg.seq_length, cfg.seed, cfg.split,
        train_samples=cfg.train_iters * gb, valid_samples=max(1, cfg.eval_iters) * gb,
        cache_path=cfg.data_cache_path, needs_data=needs_data)


def build_stage(cfg: TrainConfig, vocab_size: int, num_microbatches: int):
    """This rank's stage as training runs it: the GPT stage in Megatron's DDP, the
    optimizer (with its stage-local / error-feedback wrappers), the LR schedule and
    the sparse averager (or None). Also used by the checkpoint converter."""
    from megatron.core import parallel_state
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from megatron_asyncmesh import optim
    from megatron_asyncmesh.dataparallel.megatron import build_averager
    from megatron_asyncmesh.model import build_gpt_stage, init_layout_independent, wrap_ddp

    model = build_gpt_stage(cfg, vocab_size)
    init_layout_independent(model, cfg)
    model = wrap_ddp(cfg, model)
    model.config.finalize_model_grads_func = finalize_model_grads
    model.config.no_sync_func = model.no_sync
    stage = parallel_state.get_pipeline_model_parallel_rank()
    gb = cfg.global_batch_size
    optimizer, opt_info = optim.build_optimizer(
        cfg, model, stage, cfg.pipeline_model_parallel_size, num_microbatches)
    asynchronous = cfg.pipeline_schedule != "flush"
    if asynchronous:
        # Grad-norm / inf checks stay inside the stage: no collective across stages.
        megatron_asyncmesh.make_optimizer_stage_local(optimizer)
    optimizer = optim.wrap_error_feedback(optimizer, model, cfg, opt_info)
    averager = build_averager(cfg, model, optimizer)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=cfg.lr, min_lr=cfg.min_lr,
        lr_warmup_steps=cfg.lr_warmup_iters * gb,
        lr_decay_steps=(cfg.lr_decay_iters or cfg.train_iters) * gb,
        lr_decay_style=cfg.lr_decay_style, start_wd=cfg.weight_decay, end_wd=cfg.weight_decay,
        wd_incr_steps=cfg.train_iters * gb, wd_incr_style="constant")
    scheduler = optim.wrap_scheduler(scheduler, optimizer, cfg, opt_info)
    return model, optimizer, opt_info, scheduler, averager


def run(cfg: TrainConfig) -> dict:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_asyncmesh import checkpoint as ckpt
    from megatron_asyncmesh import distributed as mdist
    from megatron_asyncmesh.data.datasets import (
        eval_microbatches, train_iterator)
    from megatron_asyncmesh.metrics import RunWriter, final_table, peak_rss_mb, plot_losses
    from megatron_asyncmesh.pipeline.timeline import Timeline
    from megatron_asyncmesh.trainer import Trainer, reduce_records

    t_start = time.time()
    launcher = mdist.init_distributed()
    threads = mdist.set_cpu_threads(cfg)
    dp = mdist.init_model_parallel(cfg)
    rank = dist.get_rank()
    num_microbatches = cfg.num_microbatches(dp)
    resolve_data(cfg)

    # Only the first (tokens) and last (labels) stages read data.
    needs_data = (parallel_state.is_pipeline_first_stage()
                  or parallel_state.is_pipeline_last_stage())
    dp_rank = parallel_state.get_data_parallel_rank()
    gb = cfg.global_batch_size
    data = build_run_datasets(cfg, needs_data)

    model, optimizer, opt_info, scheduler, averager = build_stage(
        cfg, data.vocab_size, num_microbatches)
    stage = parallel_state.get_pipeline_model_parallel_rank()
    asynchronous = cfg.pipeline_schedule != "flush"

    start_iter, resumed_versions = 0, {}
    if cfg.load:
        start_iter, resumed_versions = ckpt.load(cfg, model, optimizer, scheduler,
                                                 num_microbatches, averager)
    schedule = None
    if asynchronous:
        # The one-line change to a Megatron loop: get_forward_backward_func()
        # now returns the no-flush schedule.
        schedule = megatron_asyncmesh.patch(cfg.pipeline_schedule, train_iters=cfg.train_iters,
                                            start_step=start_iter)
        schedule.restore_versions(resumed_versions)
    timeline = Timeline(stage, rank).install()
    trainer = Trainer(cfg, model, optimizer, scheduler, num_microbatches, schedule, timeline,
                      averager)
    train_it = train_iterator(data.train, cfg.micro_batch_size, dp_rank, dp, num_microbatches,
                              consumed_samples=start_iter * gb) if needs_data else None
    valid = (eval_microbatches(data.valid, cfg.micro_batch_size, dp_rank, dp, num_microbatches,
                               cfg.eval_iters) if needs_data and cfg.eval_iters else None)

    writer = RunWriter(cfg.run_dir, cfg.train_iters, enabled=rank == 0,
                       progress=cfg.progress, start_step=start_iter)
    val_history = []
    stats = None
    tokens_per_step = gb * cfg.seq_length
    train_time = 0.0
    timed_steps = 0

    def evaluate(step: int) -> None:
        if cfg.eval_iters:
            val = trainer.evaluate(valid, cfg.eval_iters)
            val_history.append({"step": step, "val_loss": val})
            writer.log({"step": step, "val_loss": val,
                        "val_ppl": float(torch.exp(torch.tensor(min(val, 50.0))))})

    pending = []
    last_step = cfg.train_iters

    def is_save_step(step: int) -> bool:
        return bool(cfg.save and cfg.save_interval and step % cfg.save_interval == 0)

    def flush_records() -> None:
        # One all-reduce for all steps since the last flush (see reduce_records).
        nonlocal pending, stats
        if not pending:
            return
        for rec in reduce_records(pending, dp if asynchronous else dist.get_world_size()):
            if rec["step"] % cfg.log_interval == 0 or rec["step"] == last_step:
                writer.log({"step": rec["step"], "loss": rec["loss"], "lr": rec["lr"],
                            "grad_norm": rec["grad_norm"], "step_time_s": rec["step_time_s"],
                            "tokens_per_s": tokens_per_step / rec["step_time_s"],
                            **({"dp_bytes_sent": rec["dp_bytes_sent"]} if averager else {})})
        stats = rec
        pending = []

    checkpoints = []

    def save_checkpoint(step: int, drain_step_s: float) -> None:
        # An asynchronous pipeline drained in this step (its one flush per checkpoint):
        # the step's time, against the steady steps', is what the checkpoint cost there.
        t0 = time.perf_counter()
        ckpt.save(cfg, model, optimizer, scheduler, step, schedule, averager)
        rec = {"step": step, "checkpoint_save_s": time.perf_counter() - t0,
               "drain_step_s": drain_step_s if asynchronous else None}
        checkpoints.append(rec)
        writer.log(rec)

    try:
        if start_iter == 0:
            evaluate(0)
        for step in range(start_iter + 1, cfg.train_iters + 1):
            evaluating = step % cfg.eval_interval == 0 and step != last_step
            # The pipeline drains before evaluation, checkpoints and the end.
            drain = step == last_step or evaluating or is_save_step(step)
            t0 = time.perf_counter()
            record = trainer.train_step(train_it, drain=drain, step=step)
            dt = time.perf_counter() - t0
            if step > start_iter + 1:  # the first step includes one-off set-up work
                train_time += dt
                timed_steps += 1
            pending.append(record | {"step": step, "step_time_s": dt})
            # Metrics are reduced over the world: only where nothing asynchronous is
            # lost by it (a drained pipeline; with sparse DP the replicas run freely).
            if drain or (not asynchronous and averager is None
                         and step % cfg.log_interval == 0):
                flush_records()
            elif writer.enabled:
                writer.progress(step)
            if evaluating:
                evaluate(step)
            if is_save_step(step):
                save_checkpoint(step, dt)
        flush_records()
        if not val_history or val_history[-1]["step"] != cfg.train_iters:
            evaluate(cfg.train_iters)
        if cfg.save and (not cfg.save_interval or cfg.train_iters % cfg.save_interval):
            save_checkpoint(cfg.train_iters, dt)
    finally:
        writer.close()
        timeline.uninstall()
        if asynchronous:
            from megatron_asyncmesh.pipeline.patch import unpatch

            unpatch()

    if averager is not None:    # nothing may be in flight when the ranks part
        averager.wait_in_flight()
    pipeline = pipeline_report(cfg, timeline, schedule, rank)
    per_rank = [None] * dist.get_world_size()
    # Megatron's DDP all-reduces this rank's whole fp32 gradient buffer every step.
    grad_bytes = (4 * sum(p.numel() for p in model.parameters())
                  if averager is None and dp > 1 else 0)
    dist.all_gather_object(per_rank, (round(peak_rss_mb(), 1), opt_info.as_dict(),
                                      averager.stats() if averager is not None else None,
                                      grad_bytes))
    rss = [r[0] for r in per_rank]
    stage_opts = [r[1] for r in per_rank]
    summary = {
        "final_val_loss": val_history[-1]["val_loss"] if val_history else None,
        "final_train_loss": stats["loss"] if stats else None,
        "val_loss_history": val_history,
        "tokens_per_s": tokens_per_step * timed_steps / train_time if train_time else None,
        # Steps that are neither the first, nor a pipeline warm-up or drain.
        "steady_tokens_per_s": steady_throughput(timeline, tokens_per_step),
        "train_iters": cfg.train_iters,
        "peak_rss_mb": rss,
        "pipeline_model_parallel_size": cfg.pipeline_model_parallel_size,
        "data_parallel_size": dp,
        "num_microbatches": num_microbatches,
        "pipeline_schedule": cfg.pipeline_schedule,
        "stage_utilization": pipeline["stage_utilization"],
        "stage_delay": pipeline["stage_delay"],
        "optimizer": cfg.optimizer,
        # Per stage: the delay the optimizer was told and what it derived from it.
        "stage_optimizer": {str(o["stage"]): o for o in stage_opts},
        "checkpoints": checkpoints,
        "dp_averaging": cfg.dp_averaging,
        # Per rank: what the sparse averaging handed to all-reduce (None: synchronous DP).
        "dp_averaging_stats": [r[2] for r in per_rank],
        "grad_all_reduce_bytes_per_step": [r[3] for r in per_rank],
        "pipeline": pipeline["per_rank"],
        "world_size": dist.get_world_size(),
        "launcher": launcher,
        "threads_per_rank": threads,
        "wall_time_s": time.time() - t_start,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "run_dir": os.path.abspath(cfg.run_dir),
        "config": cfg.to_dict(),
    }
    if rank == 0:
        writer.write_summary(summary)
        plot_losses(cfg.run_dir)
        plot_run_timeline(cfg.run_dir, pipeline["windows"], cfg)
        print(final_table(summary), flush=True)
    mdist.shutdown()
    return summary


def steady_throughput(timeline, tokens_per_step: int) -> Optional[float]:
    spans = [s["end"] - s["start"] for s in timeline.steps if s["steady"]]
    return tokens_per_step * len(spans) / sum(spans) if spans and sum(spans) > 0 else None


def pipeline_report(cfg: TrainConfig, timeline, schedule, rank: int) -> dict:
    """Gather every rank's timeline summary: per-stage utilization (mean over
    the stage's data-parallel replicas) and measured gradient delay; each rank
    writes its full timeline to ``<run_dir>/timeline/rank<r>.json``."""
    import torch.distributed as dist

    os.makedirs(os.path.join(cfg.run_dir, "timeline"), exist_ok=True)
    stats = schedule.stats() if schedule is not None else {
        "mode": "flush", "delay_mean": 0.0, "delay_max": 0}
    util = timeline.steady_utilization()
    timeline.save(os.path.join(cfg.run_dir, "timeline", f"rank{rank}.json"),
                  {"stats": stats, "steady_utilization": util})
    steps = [s["step"] for s in timeline.steps]
    lo = min(steps[1:] or steps or [0])
    window = timeline.window(lo, lo + 2)
    mine = {"rank": rank, "stage": timeline.stage, "steady_utilization": util, **stats}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (mine, window))
    per_rank = [g[0] for g in gathered]
    by_stage: dict = {}
    for r in per_rank:
        by_stage.setdefault(r["stage"], []).append(r)
    utilization, delay = {}, {}
    for stage, rows in sorted(by_stage.items()):
        vals = [r["steady_utilization"] for r in rows if r["steady_utilization"] is not None]
        utilization[str(stage)] = sum(vals) / len(vals) if vals else None
        delay[str(stage)] = {"mean": rows[0]["delay_mean"], "max": rows[0]["delay_max"]}
    return {"stage_utilization": utilization, "stage_delay": delay, "per_rank": per_rank,
            "windows": [g[1] for g in gathered]}


def plot_run_timeline(run_dir: str, windows, cfg: TrainConfig) -> None:
    """timeline.png: three steady steps of every rank (data-parallel replica 0
    of each stage), forward/backward/optimizer step/p2p wait."""
    from megatron_asyncmesh.pipeline.simulate import plot_timeline

    seen, rows = set(), []
    for window in windows:
        if window and window[0]["stage"] not in seen:
            seen.add(window[0]["stage"])
            rows += window
    if rows:
        plot_timeline(rows, os.path.join(run_dir, "timeline.png"),
                      f"{cfg.pipeline_schedule}: P={cfg.pipeline_model_parallel_size}, "
                      f"measured", cfg.pipeline_model_parallel_size, "s")


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_reporting_errors(lambda: run(parse_config(argv)))


def run_reporting_errors(body, errors: tuple = ()) -> int:
    """Run an entry point's ``body``; a bad-input error (ConfigError, DatasetError and
    ``errors``) is printed by rank 0 and exits 2 on every rank."""
    try:
        body()
    except (ConfigError, DatasetError, *errors) as exc:
        if _is_rank0():
            print(f"error: {exc}", file=sys.stderr, flush=True)
        else:
            # Every rank finds the same error; the launcher kills the others as soon as one
            # exits, so give rank 0 time to print it before this rank's exit ends the job.
            time.sleep(3.0)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
