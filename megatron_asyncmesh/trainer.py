"""One optimizer step and one evaluation on Megatron-core objects.

The loop body is the contract every schedule in this project keeps:
``forward_step_func(data_iterator, model) -> (output, loss_func)`` handed to
``megatron.core.pipeline_parallel.get_forward_backward_func()``, then
Megatron's optimizer step and ``OptimizerParamScheduler``.
"""

from __future__ import annotations

import math
import time
from functools import partial
from typing import Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist

from megatron_asyncmesh.config import TrainConfig


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
    return reduce_records([dict(zip(("loss_sum", "tokens"), local_loss(losses_reduced)),
                                grad_norm_sq=0.0)], 1)[0]["loss"]


def reduce_records(records: List[dict], norm_replicas: int) -> List[dict]:
    """Global loss and gradient norm of several steps with ONE all-reduce.

    Asynchronous stages finish a step at different wall times, so per-step
    metrics are kept locally and reduced together only where the pipeline is
    drained anyway (evaluation, checkpoint, end) or, for the synchronous
    schedule, at the logging interval. ``grad_norm_sq`` is this rank's squared
    norm; ranks holding the same norm are divided out by ``norm_replicas``.
    """
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    packed = torch.tensor([[r["loss_sum"], r["tokens"], r["grad_norm_sq"]] for r in records],
                          dtype=torch.float64, device=device).view(-1, 3)
    dist.all_reduce(packed)
    out = []
    for rec, (loss_sum, tokens, norm_sq) in zip(records, packed.tolist()):
        out.append({**rec, "loss": loss_sum / max(tokens, 1.0),
                    "grad_norm": math.sqrt(max(norm_sq, 0.0) / norm_replicas)})
    return out


class Trainer:
    """One optimizer step per call, on Megatron's schedule or the asynchronous one.

    With ``schedule`` (an ``AsyncPipelineSchedule`` installed by
    ``megatron_asyncmesh.patch``) the loop is unchanged except for
    ``drain=True`` before evaluation / checkpoints, and the optimizer has
    stage-local gradient statistics (``make_optimizer_stage_local``). With
    ``averager`` (``--dp-averaging sparse``) replicas do not all-reduce
    gradients; the averager runs after each optimizer step.
    """

    def __init__(self, cfg: TrainConfig, model, optimizer, scheduler, num_microbatches: int,
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
        if self.timeline is not None:
            self.timeline.add("STEP", t_opt, t_end)
            if self.schedule is not None:
                first, last = self.schedule.last_call
                steady = not (first or last or self._first_step)
            else:
                steady = not self._first_step
            self.timeline.add_step(step, t_start, t_end, steady)
        self._first_step = False
        loss_sum, tokens = local_loss(losses)
        return {"loss_sum": loss_sum, "tokens": tokens,
                "grad_norm_sq": float(grad_norm or 0.0) ** 2,
                "lr": self.optimizer.param_groups[0]["lr"], "dp_bytes_sent": sent}

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
