"""Single-process reference for the asynchronous schedules' delay semantics.

The whole GPT (PP = 1) in one process; for microbatch j every parameter of
pipeline stage k is set to the weights that stage had after
``weight_version(mode, P, k, M, j)`` optimizer steps, the loss is backpropagated
through the whole model, and after every M microbatches one optimizer step is
taken (the per-stage steps of the distributed run are independent per
parameter when gradient clipping is off, so one optimizer over all stages is
the same arithmetic). No schedule, no communication, no timing: if the
distributed executor and this agree, the executor implements the semantics.
Used by the tests and by ``tools/bench_pipeline.py --check``.
"""

from __future__ import annotations

import re
from typing import Callable, Dict, List

import torch

from megatron_asyncmesh.pipeline.schedule import weight_version


def stage_of(name: str, num_layers: int, P: int) -> int:
    """Pipeline stage (even split) that owns a parameter of the unsplit model."""
    m = re.search(r"decoder\.layers\.(\d+)\.", name)
    if m:
        return int(m.group(1)) // (num_layers // P)
    if name.startswith("embedding."):
        return 0
    return P - 1  # final_layernorm, output_layer


def run_reference(model: torch.nn.Module, optimizer_factory: Callable, batches: Callable,
                  loss_fn: Callable, *, mode: str, P: int, M: int, steps: int,
                  num_layers: int) -> Dict[str, object]:
    """Train ``model`` (the full GPT) for ``steps`` steps with the delays of
    ``mode``; returns per-microbatch losses and the final weights by name."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    stage = [stage_of(n, num_layers, P) for n in names]
    live = [p.data for p in params]
    history: List[List[torch.Tensor]] = [[t.clone() for t in live]]
    optimizer = optimizer_factory(params)
    losses: List[float] = []
    for t in range(steps):
        optimizer.zero_grad(set_to_none=True)
        for r in range(M):
            j = t * M + r
            for p, k, i in zip(params, stage, range(len(params))):
                p.data = history[weight_version(mode, P, k, M, j)][i]
            loss = loss_fn(model, batches(j)) / M
            loss.backward()
            losses.append(float(loss.detach()) * M)
        for p, t_live in zip(params, live):
            p.data = t_live
        optimizer.step()
        history.append([t_.clone() for t_ in live])
    return {"losses": losses, "weights": {n: p.detach().clone() for n, p in zip(names, params)}}
