"""One optimizer step and one evaluation on Megatron-core objects.

The loop body is the contract every schedule in this project keeps:
``forward_step_func(data_iterator, model) -> (output, loss_func)`` handed to
``megatron.core.pipeline_parallel.get_forward_backward_func()``, then
Megatron's optimizer step and ``OptimizerParamScheduler``.
"""

from __future__ import annotations

from functools import partial
from typing import Iterator, List, Optional

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


def global_mean_loss(losses_reduced: List[dict]) -> float:
    """Token-weighted mean loss over all microbatches and replicas.

    Only last-stage ranks hold losses; one all-reduce over the world gives
    every rank the same number (a synchronisation point: logging only).
    """
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for item in losses_reduced:
        total += item["lm loss"].to(device=device, dtype=torch.float64)
    dist.all_reduce(total)
    return (total[0] / total[1].clamp(min=1)).item()


class Trainer:
    def __init__(self, cfg: TrainConfig, model, optimizer, scheduler, num_microbatches: int):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        self.cfg = cfg
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.num_microbatches = num_microbatches
        self.forward_backward = get_forward_backward_func()

    def train_step(self, data_iterator: Optional[Iterator]) -> dict:
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        losses = self.forward_backward(
            forward_step_func=forward_step, data_iterator=data_iterator, model=[self.model],
            num_microbatches=self.num_microbatches, seq_length=self.cfg.seq_length,
            micro_batch_size=self.cfg.micro_batch_size, forward_only=False)
        ok, grad_norm, _ = self.optimizer.step()
        if not ok:
            raise FloatingPointError("optimizer step skipped: gradients contain inf/nan.")
        self.scheduler.step(increment=self.cfg.global_batch_size)
        return {"loss": global_mean_loss(losses), "grad_norm": float(grad_norm or 0.0),
                "lr": self.optimizer.param_groups[0]["lr"]}

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
