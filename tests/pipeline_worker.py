"""Distributed side of the pipeline exactness tests (launched by torchrun).

Every rank is one pipeline stage of a tiny GPT (TP = DP = 1). For each
(mode, M) in the job list it builds a fresh model and Megatron optimizer,
installs the schedule with ``megatron_asyncmesh.patch`` and trains a few
steps on synthetic microbatches (a drain + evaluation in the middle), then
saves per-microbatch losses (last stage), the stage's final weights under
their unsplit names, the first step's gradients and the measured delays.
The single-process reference (``reference_main``) trains the unsplit model
with the same delays; tests compare the two.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import megatron_asyncmesh  # noqa: F401
import torch

VOCAB, SEQ, MB = 96, 16, 2


def model_cfg(P: int):
    from megatron_asyncmesh.config import TrainConfig

    return TrainConfig(num_layers=2 * P, hidden_size=32, num_attention_heads=2, seq_length=SEQ,
                       micro_batch_size=MB, global_batch_size=MB,
                       pipeline_model_parallel_size=P, untie_embeddings_and_output_weights=True,
                       make_vocab_size_divisible_by=32, seed=7, lr=1e-2, min_lr=1e-2)


def batch(j: int) -> dict:
    g = torch.Generator().manual_seed(1000 + j)
    tokens = torch.randint(0, VOCAB, (MB, SEQ + 1), generator=g)
    return {"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(),
            "loss_mask": torch.ones(MB, SEQ), "position_ids": torch.arange(SEQ).repeat(MB, 1)}


def batches_from(j0: int):
    j = j0
    while True:
        yield batch(j)
        j += 1


def optimizer_config(optimizer: str):
    from megatron.core.optimizer import OptimizerConfig

    return OptimizerConfig(optimizer=optimizer, lr=1e-2, min_lr=1e-2, weight_decay=0.0,
                           adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8, sgd_momentum=0.0,
                           clip_grad=0.0, params_dtype=torch.float32)


def run_job(P: int, mode: str, M: int, steps: int, optimizer: str, out_dir: str,
            use_megatron: bool = False) -> None:
    from megatron.core import parallel_state
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_asyncmesh.dataparallel.megatron import wrap_ddp
    from megatron_asyncmesh.model import (
        build_gpt_stage, global_parameter_names, init_layout_independent)
    from megatron_asyncmesh.optim.stage_local import make_optimizer_stage_local
    from megatron_asyncmesh.pipeline.install import unpatch
    from megatron_asyncmesh.runner.megatron import forward_step

    cfg = model_cfg(P)
    model = build_gpt_stage(cfg, VOCAB)
    init_layout_independent(model, cfg)
    names = global_parameter_names(model)
    model = wrap_ddp(cfg, model)
    model.config.finalize_model_grads_func = finalize_model_grads
    model.config.no_sync_func = model.no_sync
    opt = get_megatron_optimizer(optimizer_config(optimizer), [model])
    schedule = None
    if not use_megatron:
        schedule = megatron_asyncmesh.patch(mode, train_iters=steps)
        make_optimizer_stage_local(opt)
    fb = get_forward_backward_func()
    stage = parallel_state.get_pipeline_model_parallel_rank()
    it = batches_from(0) if stage in (0, P - 1) else None
    losses, grads0 = [], {}
    drain_at = steps // 2
    for t in range(steps):
        if schedule is not None and t == drain_at - 1:
            schedule.request_drain()
        model.zero_grad_buffer()
        opt.zero_grad()
        out = fb(forward_step_func=forward_step, data_iterator=it, model=[model],
                 num_microbatches=M, seq_length=SEQ, micro_batch_size=MB, forward_only=False)
        losses += [float(o["lm loss"][0] / o["lm loss"][1]) for o in out]
        if t == 0:
            grads0 = {names[n]: p.main_grad.detach().clone()
                      for n, p in model.module.named_parameters()}
        opt.step()
        if t == drain_at - 1:
            # An evaluation between segments: forward-only on the drained pipeline.
            fb(forward_step_func=forward_step, data_iterator=batches_from(10_000)
               if stage in (0, P - 1) else None, model=[model], num_microbatches=M,
               seq_length=SEQ, micro_batch_size=MB, forward_only=True)
    weights = {names[n]: p.detach().clone() for n, p in model.module.named_parameters()}
    stats = schedule.stats() if schedule is not None else {}
    unpatch()
    tag = f"{mode}{'-megatron' if use_megatron else ''}-M{M}-{optimizer}"
    torch.save({"losses": losses, "weights": weights, "grads0": grads0, "stats": stats},
               os.path.join(out_dir, f"{tag}-stage{stage}.pt"))


H_LIN = 8


def linear_job(P: int, M: int, steps: int, out_dir: str, lr: float = 0.05) -> None:
    """2bw with plain SGD on a deep linear network y = W_{P-1} ... W_0 x (one
    H x H matrix per stage, loss 0.5 ||y - target||^2 averaged over the M
    microbatches): the gradient has a closed form, so the test can check
    W(t+1) = W(t) - lr g(W(t-1)) at every stage from the recorded weights."""
    from megatron.core import parallel_state
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.module import MegatronModule

    from megatron_asyncmesh.pipeline.install import unpatch

    stage = parallel_state.get_pipeline_model_parallel_rank()
    config = TransformerConfig(num_layers=P, hidden_size=H_LIN, num_attention_heads=1,
                               pipeline_model_parallel_size=P, pipeline_dtype=torch.float32,
                               deallocate_pipeline_outputs=True)

    class LinearStage(MegatronModule):
        def __init__(self):
            super().__init__(config)
            g = torch.Generator().manual_seed(50 + stage)
            self.weight = torch.nn.Parameter(torch.eye(H_LIN) + 0.3 * torch.randn(
                H_LIN, H_LIN, generator=g))
            self.input_tensor = None

        def set_input_tensor(self, tensor):
            self.input_tensor = tensor[0] if isinstance(tensor, list) else tensor

        def forward(self, x):
            x = x if self.input_tensor is None else self.input_tensor
            return x @ self.weight.t()

    def data(j):
        g = torch.Generator().manual_seed(77 + j)
        return torch.randn(SEQ, MB, H_LIN, generator=g), torch.randn(SEQ, MB, H_LIN, generator=g)

    def forward_step_func(data_iterator, model):
        x, target = next(data_iterator) if data_iterator is not None else (None, None)
        out = model(x if stage == 0 else None)

        def loss_func(y):
            loss = 0.5 * ((y - target) ** 2).sum()
            return loss, {"loss": loss.detach()}
        return out, loss_func

    def stream():
        j = 0
        while True:
            yield data(j)
            j += 1

    model = LinearStage()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    schedule = megatron_asyncmesh.patch("2bw", train_iters=steps)
    from megatron.core.pipeline_parallel import get_forward_backward_func

    fb = get_forward_backward_func()
    it = stream() if stage in (0, P - 1) else None
    history = [model.weight.detach().clone()]
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        fb(forward_step_func=forward_step_func, data_iterator=it, model=[model],
           num_microbatches=M, seq_length=SEQ, micro_batch_size=MB, forward_only=False)
        opt.step()
        history.append(model.weight.detach().clone())
    unpatch()
    data_used = [data(j) for j in range(steps * M)]
    torch.save({"history": history, "data": data_used, "lr": lr, "stats": schedule.stats()},
               os.path.join(out_dir, f"linear-2bw-M{M}-stage{stage}.pt"))


def worker_main(args) -> int:
    from megatron_asyncmesh import distributed as mdist

    cfg = model_cfg(args.P)
    mdist.init_distributed()
    mdist.set_cpu_threads(cfg)
    mdist.init_model_parallel(cfg)
    for job in json.loads(args.jobs):
        if job["mode"] == "reference-only":
            continue
        if job["mode"] == "linear":
            linear_job(args.P, job["M"], job["steps"], args.out)
            continue
        run_job(args.P, job["mode"], job["M"], job["steps"], job.get("optimizer", "adam"),
                args.out, job.get("megatron", False))
    mdist.shutdown()
    return 0


def reference_main(args) -> int:
    """Single process: the unsplit model with the delay semantics of each job."""
    from megatron_asyncmesh import distributed as mdist
    from megatron_asyncmesh.model import build_gpt_stage, init_layout_independent
    from megatron_asyncmesh.pipeline.reference import run_reference

    cfg1 = model_cfg(1)
    mdist.init_distributed()
    mdist.init_model_parallel(cfg1)
    for job in json.loads(args.jobs):
        if "ref_mode" not in job:
            continue
        cfg = model_cfg(args.P)
        cfg.pipeline_model_parallel_size = 1
        model = build_gpt_stage(cfg, VOCAB)
        init_layout_independent(model, cfg)
        opt_name = job.get("optimizer", "adam")

        def factory(params):
            if opt_name == "sgd":
                return torch.optim.SGD(params, lr=1e-2)
            return torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.95), eps=1e-8,
                                     weight_decay=0.0)

        def loss_fn(m, b):
            per_token = m(b["tokens"], b["position_ids"], None, labels=b["labels"])
            return (per_token.float() * b["loss_mask"]).sum() / b["loss_mask"].sum()

        ref = run_reference(model, factory, batch, loss_fn, mode=job["ref_mode"], P=args.P,
                            M=job["M"], steps=job["steps"], num_layers=cfg.num_layers)
        torch.save(ref, os.path.join(args.out, f"ref-{job['ref_mode']}-M{job['M']}-{opt_name}.pt"))
    mdist.shutdown()
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--P", type=int, required=True)
    p.add_argument("--jobs", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--reference", action="store_true")
    a = p.parse_args()
    sys.exit(reference_main(a) if a.reference else worker_main(a))
