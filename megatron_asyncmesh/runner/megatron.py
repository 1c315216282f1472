"""The Megatron-core engine: this rank's stage built as training runs it, one optimizer
step and one evaluation on Megatron's objects, checkpoints and the pipeline's report.

The loop body is the contract every schedule in this project keeps:
``forward_step_func(data_iterator, model) -> (output, loss_func)`` handed to
``megatron.core.pipeline_parallel.get_forward_backward_func()``, then
Megatron's optimizer step and ``OptimizerParamScheduler``. The run around the step
(evaluation points, drains, metrics, summary) is :mod:`megatron_asyncmesh.runner.loop`.
"""

from __future__ import annotations

import os
import time
from functools import partial
from typing import Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist

from megatron_asyncmesh.checkpoint import state as ckpt
from megatron_asyncmesh.dataparallel.consensus import average_replicas, consensus
from megatron_asyncmesh.dataparallel.megatron import averaging_group
from megatron_asyncmesh.dataparallel.replicas import replica_layout
from megatron_asyncmesh.optim.builder import describe_staleness
from megatron_asyncmesh.optim.main_params import copy_main_to_model, main_params
from megatron_asyncmesh.pipeline import install
from megatron_asyncmesh.pipeline.simulate import plot_timeline
from megatron_asyncmesh.pipeline.timeline import Timeline
from megatron_asyncmesh.runner.reduce import world_mean_loss
from megatron_asyncmesh.stage import build_stage


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Masked token-mean cross entropy, Megatron-LM's 3-tuple form.

    ``output_tensor`` is GPTModel's per-token loss [b, s]. Returning
    (sum, num_tokens, report) lets Megatron's schedule divide by the token
    count and by the number of microbatches.
    """
    losses = output_tensor.float()
    mask = loss_mask.view(-1).float()
    loss_sum = torch.sum(losses.view(-1) * mask)
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach(), mask.sum()])
    return loss_sum, num_tokens, {"lm loss": report}


def forward_step(data_iterator: Optional[Iterator], model):
    """Megatron's forward_step_func for a GPT stage.

    The first stage reads tokens and positions, the last labels and the loss
    mask; middle stages get their input through ``set_input_tensor`` (done by
    the schedule) and ignore the iterator (which is None there).
    """
    from megatron.core import parallel_state

    batch = next(data_iterator) if data_iterator is not None else None
    first = parallel_state.is_pipeline_first_stage()
    last = parallel_state.is_pipeline_last_stage()

    def field(name: str, wanted: bool):
        if not wanted:
            return None
        value = batch[name]
        return value.cuda(non_blocking=True) if torch.cuda.is_available() else value

    output = model(field("tokens", first), field("position_ids", first), None,
                   labels=field("labels", last))
    loss_mask = field("loss_mask", last)
    return output, partial(loss_func, loss_mask)


def local_loss(losses_reduced: List[dict]) -> Tuple[float, float]:
    """(sum of token losses, token count) of this rank's microbatches; only
    last-stage ranks have any."""
    total = torch.zeros(2, dtype=torch.float64)
    for item in losses_reduced:
        total += item["lm loss"].detach().to(device="cpu", dtype=torch.float64)
    return float(total[0]), float(total[1])


def global_mean_loss(losses_reduced: List[dict]) -> float:
    """Token-weighted mean loss over all microbatches and replicas (one
    all-reduce over the world: a synchronisation point, used for evaluation)."""
    return world_mean_loss(*local_loss(losses_reduced))


class Trainer:
    """One optimizer step per call, on Megatron's schedule or the asynchronous one.

    With ``schedule`` (an ``AsyncPipelineSchedule`` installed by
    ``megatron_asyncmesh.patch``) the loop is unchanged except for
    ``drain=True`` before evaluation / checkpoints, and the optimizer has
    stage-local gradient statistics (``make_optimizer_stage_local``). With
    ``averager`` (``--dp-averaging sparse``) replicas do not all-reduce
    gradients; the averager runs after each optimizer step.
    """

    def __init__(self, cfg, model, optimizer, scheduler, num_microbatches: int,
                 schedule=None, timeline=None, averager=None):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        self.cfg = cfg
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.num_microbatches = num_microbatches
        self.schedule = schedule
        self.timeline = timeline
        self.averager = averager
        if schedule is not None:
            schedule.timeline = timeline
        self.forward_backward = get_forward_backward_func()
        self._first_step = True

    def train_step(self, data_iterator: Optional[Iterator], drain: bool = False,
                   step: int = 0) -> dict:
        """Run one step; return this rank's local record (see reduce_records)."""
        if self.schedule is not None and drain:
            self.schedule.request_drain()
        t_start = time.time()
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        losses = self.forward_backward(
            forward_step_func=forward_step, data_iterator=data_iterator, model=[self.model],
            num_microbatches=self.num_microbatches, seq_length=self.cfg.seq_length,
            micro_batch_size=self.cfg.micro_batch_size, forward_only=False)
        t_opt = time.time()
        ok, grad_norm, _ = self.optimizer.step()
        if not ok:
            raise FloatingPointError("optimizer step skipped: gradients contain inf/nan.")
        self.scheduler.step(increment=self.cfg.global_batch_size)
        # AsyncMesh: launch this step's sparse average, apply the one now --dp-delay old.
        sent = self.averager.step() if self.averager is not None else 0
        t_end = time.time()
        if self.schedule is not None:
            first, last = self.schedule.last_call
            steady = not (first or last or self._first_step)
        else:
            steady = not self._first_step
        if self.timeline is not None:
            self.timeline.add("STEP", t_opt, t_end)
            self.timeline.add_step(step, t_start, t_end, steady)
        self._first_step = False
        loss_sum, tokens = local_loss(losses)
        return {"loss_sum": loss_sum, "tokens": tokens,
                "grad_norm_sq": float(grad_norm or 0.0) ** 2,
                "lr": self.optimizer.param_groups[0]["lr"], "dp_bytes_sent": sent,
                "steady": steady}

    @torch.no_grad()
    def evaluate(self, batches: Optional[List[dict]], eval_iters: int) -> float:
        self.model.eval()
        losses = []
        for it in range(eval_iters):
            chunk = None
            if batches is not None:
                chunk = iter(batches[it * self.num_microbatches:(it + 1) * self.num_microbatches])
            losses += self.forward_backward(
                forward_step_func=forward_step, data_iterator=chunk, model=[self.model],
                num_microbatches=self.num_microbatches, seq_length=self.cfg.seq_length,
                micro_batch_size=self.cfg.micro_batch_size, forward_only=True)
        self.model.train()
        return global_mean_loss(losses)


class MegatronEngine:
    """Training on Megatron-core (``asyncmesh-train``): this rank's pipeline stage, with
    Megatron's synchronous 1F1B or the asynchronous executor, Megatron's DDP or the
    sparse averager. One :meth:`train_step` is one optimizer step of this stage."""

    name = "megatron"
    zero_stage = None

    @staticmethod
    def needs_data() -> bool:
        """Only the first (tokens) and last (labels) stages read data."""
        from megatron.core import parallel_state

        return (parallel_state.is_pipeline_first_stage()
                or parallel_state.is_pipeline_last_stage())

    def __init__(self, cfg, dp: int, num_microbatches: int, data):
        from megatron.core import parallel_state

        self.cfg, self.dp, self.num_microbatches = cfg, dp, num_microbatches
        self.model, self.optimizer, self.opt_info, self.scheduler, self.averager = \
            build_stage(cfg, data.vocab_size, num_microbatches)
        self.layout = (replica_layout(cfg.dp_ranks_per_replica)
                       if cfg.dp_averaging == "sparse" else None)
        if self.layout is not None and dist.get_rank() == 0:
            print(self.layout.describe(), flush=True)
            note = self.averager.cfg.overlap_note() if self.averager is not None else None
            if note:
                print(note, flush=True)
        stage = parallel_state.get_pipeline_model_parallel_rank()
        self.asynchronous = cfg.pipeline_schedule != "flush"
        P = parallel_state.get_pipeline_model_parallel_world_size()
        if self.asynchronous and P > 1 and dist.get_rank() == 0:
            print(describe_staleness(cfg.pipeline_schedule, P, num_microbatches),
                  flush=True)
        self.start_iter, resumed_versions = 0, {}
        self.load_s = None
        if cfg.load:
            t0 = time.perf_counter()
            self.start_iter, resumed_versions = ckpt.load(
                cfg, self.model, self.optimizer, self.scheduler, num_microbatches,
                self.averager)
            self.load_s = time.perf_counter() - t0
        self.schedule = None
        if self.asynchronous:
            # The one-line change to a Megatron loop: get_forward_backward_func()
            # now returns the no-flush schedule.
            self.schedule = install.patch(cfg.pipeline_schedule, train_iters=cfg.train_iters,
                                          start_step=self.start_iter)
            self.schedule.restore_versions(resumed_versions)
        self.timeline = Timeline(stage, dist.get_rank()).install()
        self.trainer = Trainer(cfg, self.model, self.optimizer, self.scheduler,
                               num_microbatches, self.schedule, self.timeline, self.averager)
        # Metrics are reduced over the world only where nothing asynchronous is lost by it
        # (a drained pipeline; with sparse DP the replicas run freely).
        self.synchronous = not self.asynchronous and self.averager is None
        # Ranks holding the same gradient norm (see reduce_records).
        self.norm_replicas = dp if self.asynchronous else dist.get_world_size()
        self.optimizer_name = cfg.optimizer
        self.pipeline_schedule = cfg.pipeline_schedule

    def train_step(self, data_iterator, step: int, drain: bool) -> dict:
        return self.trainer.train_step(data_iterator, drain=drain, step=step)

    def evaluate(self, valid) -> float:
        return self.trainer.evaluate(valid, self.cfg.eval_iters)

    def _replica_group(self):
        return averaging_group(self.cfg)

    def consensus_evaluate(self, valid):
        """(validation loss of the replicas' mean, bytes sent) with sparse averaging;
        None otherwise (the replicas are one model already)."""
        if self.averager is None:
            return None
        params = [p for p in self.model.parameters() if p.requires_grad]
        with consensus(params, self._replica_group()) as sent:
            loss = self.trainer.evaluate(valid, self.cfg.eval_iters)
        return loss, sent

    def final_average(self):
        """--dp-final-average: the replicas become their mean (main parameters included),
        so the last checkpoint holds one model. Returns the bytes sent, or None."""
        if self.averager is None or not self.cfg.dp_final_average:
            return None
        main_of, refresh = main_params(self.optimizer)
        targets = [main_of.get(id(p), p) for p in self.model.parameters() if p.requires_grad]
        return average_replicas(targets, self._replica_group(),
                                lambda: copy_main_to_model(refresh))

    def save(self, step: int) -> None:
        ckpt.save(self.cfg, self.model, self.optimizer, self.scheduler, step, self.schedule,
                  self.averager)

    def close(self) -> None:
        self.timeline.uninstall()
        if self.asynchronous:
            install.unpatch()
        if self.averager is not None:    # nothing may be in flight when the ranks part
            self.averager.wait_in_flight()

    def rank_info(self, steps: int) -> dict:
        """This rank's part of the summary (gathered over the world)."""
        from megatron.core import parallel_state

        # Megatron's DDP all-reduces this rank's whole fp32 gradient buffer every step
        # (inside the replica only with sparse averaging).
        params = sum(p.numel() for p in self.model.parameters())
        in_replica = self.layout is not None and self.layout.ranks_per_replica > 1
        return {"stage_optimizer": self.opt_info.as_dict(),
                "dp_averaging_stats": (self.averager.stats() if self.averager is not None
                                       else None),
                "grad_all_reduce_bytes_per_step": (4 * params if self.averager is None
                                                   and self.dp > 1 else 0),
                # Megatron's collectives go through torch.distributed, not deepspeed.comm.
                "comm_bytes_by_op": None, "comm_bytes_per_step": None,
                "replica_grad_all_reduce_bytes_per_step": 4 * params if in_replica else 0,
                "parameters": params,
                "data_parallel_rank": parallel_state.get_data_parallel_rank(),
                "replica": (self.layout.replica if self.layout is not None
                            else parallel_state.get_data_parallel_rank())}

    def pipeline(self) -> dict:
        """Per-stage utilization and delay (gathered); writes this rank's timeline."""
        return pipeline_report(self.cfg, self.timeline, self.schedule, dist.get_rank())

    def plot(self, run_dir: str, pipeline: dict) -> None:
        plot_run_timeline(run_dir, pipeline["windows"], self.cfg)


def pipeline_report(cfg, timeline, schedule, rank: int) -> dict:
    """Gather every rank's timeline summary: per-stage utilization (mean over
    the stage's data-parallel replicas) and measured gradient delay; each rank
    writes its full timeline to ``<run_dir>/timeline/rank<r>.json``."""
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


def plot_run_timeline(run_dir: str, windows, cfg) -> None:
    """timeline.png: three steady steps of every rank (data-parallel replica 0
    of each stage), forward/backward/optimizer step/p2p wait."""
    seen, rows = set(), []
    for window in windows:
        if window and window[0]["stage"] not in seen:
            seen.add(window[0]["stage"])
            rows += window
    if rows:
        plot_timeline(rows, os.path.join(run_dir, "timeline.png"),
                      f"{cfg.pipeline_schedule}: P={cfg.pipeline_model_parallel_size}, "
                      f"measured", cfg.pipeline_model_parallel_size, "s")
