"""One run skeleton for both engines: set-up, evaluation points, drains, timing, the
per-rank summary, ``metrics.jsonl`` / ``summary.json`` (one schema, one meaning per key:
:data:`megatron_asyncmesh.metrics.SUMMARY_KEYS`), plots and the final table.

An engine (``runner.megatron.MegatronEngine``, ``runner.deepspeed.DeepSpeedEngineRun``)
only takes steps. It is built after the process groups and the data, and provides::

    needs_data() -> bool                 (static: does this rank read data?)
    start_iter, asynchronous (a no-flush pipeline), synchronous (metrics may be reduced
    at any step), norm_replicas, optimizer_name, pipeline_schedule, zero_stage, name
    train_step(data_iterator, step, drain) -> local record (loss_sum, tokens,
        grad_norm_sq or None, lr, dp_bytes_sent, steady)
    evaluate(valid_batches) -> float     (collective)
    save(step), close(), rank_info(steps) -> dict, pipeline() -> dict, plot(run_dir, pipeline)
"""

from __future__ import annotations

import math
import os
import sys
import time

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_asyncmesh import cpu_compat
from megatron_asyncmesh import distributed as mdist
from megatron_asyncmesh.checkpoint.state import saved_config
from megatron_asyncmesh.data.datasets import (
    build_run_datasets, eval_microbatches, resolve_data, train_iterator)
from megatron_asyncmesh.data.indexed import DatasetError
from megatron_asyncmesh.dataparallel.config import resolve_selector
from megatron_asyncmesh.metrics import (
    SUMMARY_KEYS, RunWriter, final_table, peak_rss_mb, plot_losses)
from megatron_asyncmesh.options import ConfigError
from megatron_asyncmesh.runner.reduce import reduce_records


def run(cfg, engine_cls, **engine_kwargs) -> dict:
    """Train ``cfg`` with ``engine_cls`` (collective over the launched world)."""
    t_start = time.time()
    launcher = mdist.init_distributed(cfg.distributed_timeout_minutes)
    threads = mdist.set_cpu_threads(cfg)
    dp = mdist.init_model_parallel(cfg)
    rank = dist.get_rank()
    num_microbatches = cfg.num_microbatches(dp)
    resolve_data(cfg)
    resolve_selector(cfg, saved_config(cfg.load), f"--load {cfg.load!r}")
    needs_data = engine_cls.needs_data()
    dp_rank = parallel_state.get_data_parallel_rank()
    gb = cfg.global_batch_size
    data = build_run_datasets(cfg, needs_data)
    engine = engine_cls(cfg, dp, num_microbatches, data, **engine_kwargs)
    start_iter = engine.start_iter
    train_it = train_iterator(data.train, cfg.micro_batch_size, dp_rank, dp, num_microbatches,
                              consumed_samples=start_iter * gb) if needs_data else None
    valid = (eval_microbatches(data.valid, cfg.micro_batch_size, dp_rank, dp, num_microbatches,
                               cfg.eval_iters) if needs_data and cfg.eval_iters else None)

    writer = RunWriter(cfg.run_dir, cfg.train_iters, enabled=rank == 0,
                       progress=cfg.progress, start_step=start_iter)
    val_history, checkpoints, pending = [], [], []
    stats = None
    tokens_per_step = gb * cfg.seq_length
    train_time, timed_steps, steady_time, steady_steps = 0.0, 0, 0.0, 0
    # Seconds spent in training steps so far, every step counted (evaluations and
    # checkpoints not): the wall-clock axis of time-to-target comparisons.
    train_clock = 0.0
    last_step = cfg.train_iters
    dt = 0.0
    # Device synchronisations inside training steps (counted by the CPU layer; None on a
    # GPU): an asynchronous step must ask for none.
    step_syncs = 0 if cpu_compat.device_synchronizations() is not None else None
    final_average_bytes = None

    def evaluate(step: int) -> None:
        if cfg.eval_iters:
            val = engine.evaluate(valid)
            # Sparse averaging: the replicas' mean too (a dense all-reduce of a copy; the
            # replicas continue untouched); its bytes are logged apart from the steps'.
            mean = engine.consensus_evaluate(valid)
            rec = {"step": step, "val_loss": val, "val_ppl": math.exp(min(val, 50.0)),
                   "consensus_val_loss": mean[0] if mean else None,
                   "consensus_bytes": mean[1] if mean else 0,
                   "train_time_s": round(train_clock, 3)}
            val_history.append({k: rec[k] for k in ("step", "val_loss",
                                                    "consensus_val_loss", "train_time_s")})
            writer.log(rec)

    def is_save_step(step: int) -> bool:
        # The last step's checkpoint is written after the final evaluation (and, with
        # sparse averaging, the replicas' final average).
        return bool(cfg.save and cfg.save_interval and step % cfg.save_interval == 0
                    and step != last_step)

    def flush_records() -> None:
        # One all-reduce for all steps since the last flush (see reduce_records).
        nonlocal pending, stats
        if not pending:
            return
        for rec in reduce_records(pending, engine.norm_replicas):
            if rec["step"] % cfg.log_interval == 0 or rec["step"] == last_step:
                writer.log({"step": rec["step"], "loss": rec["loss"], "lr": rec["lr"],
                            "grad_norm": rec["grad_norm"], "step_time_s": rec["step_time_s"],
                            "tokens_per_s": tokens_per_step / rec["step_time_s"],
                            "dp_bytes_sent": rec["dp_bytes_sent"]})
            stats = rec
        pending = []

    def save_checkpoint(step: int, drain_step_s: float) -> None:
        # An asynchronous pipeline drained in this step (its one flush per checkpoint):
        # the step's time, against the steady steps', is what the checkpoint cost there.
        t0 = time.perf_counter()
        engine.save(step)
        rec = {"step": step, "checkpoint_save_s": time.perf_counter() - t0,
               "drain_step_s": drain_step_s if engine.asynchronous else None}
        checkpoints.append(rec)
        writer.log(rec)

    try:
        if start_iter == 0:
            evaluate(0)
        for step in range(start_iter + 1, cfg.train_iters + 1):
            evaluating = step % cfg.eval_interval == 0 and step != last_step
            # The pipeline drains before evaluation, checkpoints and the end.
            drain = step == last_step or evaluating or is_save_step(step)
            syncs_before = cpu_compat.device_synchronizations()
            t0 = time.perf_counter()
            record = engine.train_step(train_it, step, drain)
            dt = time.perf_counter() - t0
            train_clock += dt
            if step_syncs is not None:
                step_syncs += cpu_compat.device_synchronizations() - syncs_before
            if step > start_iter + 1:  # the first step includes one-off set-up work
                train_time += dt
                timed_steps += 1
            if record["steady"]:
                steady_time += dt
                steady_steps += 1
            pending.append(record | {"step": step, "step_time_s": dt})
            # Metrics are reduced over the world: only where nothing asynchronous is
            # lost by it (a drained pipeline; with sparse DP the replicas run freely).
            if drain or (engine.synchronous and step % cfg.log_interval == 0):
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
        # Sparse averaging: the replicas become one model before the last checkpoint.
        final_average_bytes = engine.final_average()
        if cfg.save and start_iter < cfg.train_iters:
            save_checkpoint(cfg.train_iters, dt)
    finally:
        writer.close()
        engine.close()

    pipeline = engine.pipeline()
    per_rank = [None] * dist.get_world_size()
    mine = {"rank": rank, "peak_rss_mb": round(peak_rss_mb(), 1),
            "peak_device_memory_mb": (round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)
                                      if torch.cuda.is_available() else None),
            "device_synchronizations_in_steps": step_syncs,
            "checkpoint_load_s": engine.load_s,
            **engine.rank_info(cfg.train_iters - start_iter)}
    dist.all_gather_object(per_rank, mine)
    summary = {
        "engine": engine.name,
        "zero_stage": engine.zero_stage,
        "final_val_loss": val_history[-1]["val_loss"] if val_history else None,
        # Sparse averaging: the replicas' mean's (what --dp-final-average leaves, and
        # what the last checkpoint then holds); None for synchronous data parallelism.
        "consensus_val_loss": val_history[-1]["consensus_val_loss"] if val_history else None,
        "final_average_bytes": final_average_bytes,
        "final_train_loss": stats["loss"] if stats else None,
        "val_loss_history": val_history,
        # Every step but the first (one-off set-up work).
        "tokens_per_s": tokens_per_step * timed_steps / train_time if train_time else None,
        # Steps that are neither the first, nor a pipeline warm-up or drain.
        "steady_tokens_per_s": (tokens_per_step * steady_steps / steady_time
                                if steady_time > 0 else None),
        "train_iters": cfg.train_iters,
        "start_iteration": start_iter,
        "peak_rss_mb": [r["peak_rss_mb"] for r in per_rank],
        "pipeline_model_parallel_size": cfg.pipeline_model_parallel_size,
        "data_parallel_size": dp,
        "num_microbatches": num_microbatches,
        "pipeline_schedule": engine.pipeline_schedule,
        "stage_utilization": pipeline["stage_utilization"],
        "stage_delay": pipeline["stage_delay"],
        "optimizer": engine.optimizer_name,
        # Per stage: the delay the optimizer was told and what it derived from it.
        "stage_optimizer": {str(r["stage_optimizer"]["stage"]): r["stage_optimizer"]
                            for r in per_rank},
        "checkpoints": checkpoints,
        # Seconds this rank spent loading --load (verification included), per rank.
        "checkpoint_load_s": [r["checkpoint_load_s"] for r in per_rank],
        "dp_averaging": cfg.dp_averaging,
        # Per rank: what the sparse averaging handed to all-reduce (None: synchronous DP).
        "dp_averaging_stats": [r["dp_averaging_stats"] for r in per_rank],
        # Per rank: gradient all-reduce bytes per step where computed from the buffers
        # (Megatron's DDP), and what deepspeed.comm's logger counted (DeepSpeed engine).
        "grad_all_reduce_bytes_per_step": [r["grad_all_reduce_bytes_per_step"]
                                           for r in per_rank],
        # Per rank: the same inside a replica of several ranks (its fast links).
        "replica_grad_all_reduce_bytes_per_step": [
            r.get("replica_grad_all_reduce_bytes_per_step", 0) for r in per_rank],
        "comm_bytes_per_step": [r["comm_bytes_per_step"] for r in per_rank],
        "per_rank": per_rank,
        "pipeline": pipeline["per_rank"],
        # One replica's model: the parameters of its stages.
        "parameters": sum(r["parameters"] for r in per_rank
                          if r.get("data_parallel_rank", r["replica"]) == 0),
        "world_size": dist.get_world_size(),
        "launcher": launcher,
        "threads_per_rank": threads,
        "wall_time_s": time.time() - t_start,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "run_dir": os.path.abspath(cfg.run_dir),
        "config": cfg.to_dict(),
    }
    assert set(summary) == set(SUMMARY_KEYS), sorted(set(summary) ^ set(SUMMARY_KEYS))
    if rank == 0:
        writer.write_summary(summary)
        plot_losses(cfg.run_dir)
        engine.plot(cfg.run_dir, pipeline)
        print(final_table(summary), flush=True)
    mdist.shutdown()
    return summary


def _is_rank0() -> bool:
    if dist.is_initialized():
        return dist.get_rank() == 0
    return os.environ.get("RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0")) == "0"


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
