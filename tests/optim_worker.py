"""One process: a Megatron-core optimizer built by ``megatron_asyncmesh.optim`` against its
reference math, step by step, on a real GPTModel.

Two copies of the same tiny GPT (layout-independent init makes them identical):
one inside Megatron's DDP with the optimizer ``build_optimizer`` returns (the
registry entry, Megatron's parameter groups and wrappers), one bare with the
reference optimizer(s) built directly from torch / emerging-optimizers, each
parameter in the group (weight decay, lr) Megatron put it in. Both take the
same forward / backward on the same batches; the worker writes, per step, the
largest parameter difference. Launched by tests/test_optimizers.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import megatron_asyncmesh  # noqa: F401
import torch

VOCAB, SEQ, MB = 96, 16, 2


def cfg_for(optimizer: str):
    from megatron_asyncmesh.config import TrainConfig

    return TrainConfig(num_layers=2, hidden_size=32, num_attention_heads=2, seq_length=SEQ,
                       micro_batch_size=MB, global_batch_size=MB, optimizer=optimizer,
                       untie_embeddings_and_output_weights=True, make_vocab_size_divisible_by=32,
                       seed=11, lr=3e-3, min_lr=3e-3, weight_decay=0.1, clip_grad=0.0,
                       soap_precondition_frequency=1, soap_stage_aware=False,
                       # the library's Muon orthogonalizes the fused QKV matrix whole
                       muon_split_qkv=False)


def batch(t: int):
    g = torch.Generator().manual_seed(500 + t)
    tokens = torch.randint(0, VOCAB, (MB, SEQ + 1), generator=g)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def loss_of(model, t: int):
    tokens, labels = batch(t)
    pos = torch.arange(SEQ).repeat(MB, 1)
    return model(tokens, pos, None, labels=labels).float().mean()


def reference_optimizers(optimizer: str, cfg, groups):
    """groups: list of (params, weight_decay, kind, lr) with kind 'matrix' or 'other'."""
    from emerging_optimizers.orthogonalized_optimizers import Muon
    from emerging_optimizers.soap import SOAP

    other = [{"params": p, "weight_decay": wd, "lr": lr}
             for p, wd, kind, lr in groups if kind == "other"]
    matrix = [{"params": p, "weight_decay": wd, "lr": lr}
              for p, wd, kind, lr in groups if kind == "matrix"]
    if optimizer == "nadamw":
        every = [{"params": p, "weight_decay": wd, "lr": lr} for p, wd, _, lr in groups]
        return [torch.optim.NAdam(every, lr=cfg.lr, betas=(cfg.nadamw_beta1, cfg.nadamw_beta2),
                                  eps=cfg.adam_eps, momentum_decay=cfg.nadamw_momentum_decay,
                                  decoupled_weight_decay=True)]
    adam = torch.optim.AdamW(other, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                             eps=cfg.adam_eps)
    if optimizer == "muon":
        return [adam, Muon(matrix, lr=cfg.lr, momentum=cfg.muon_momentum,
                           nesterov=cfg.muon_nesterov, weight_decay_method="decoupled",
                           extra_scale_factor=cfg.muon_extra_scale_factor,
                           fp32_matmul_prec=cfg.resolved_muon_fp32_matmul_prec())]
    if optimizer == "soap":
        return [adam, SOAP(matrix, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                           shampoo_beta=cfg.soap_shampoo_beta, eps=cfg.adam_eps,
                           fp32_matmul_prec="highest", qr_fp32_matmul_prec="highest")]
    raise ValueError(optimizer)


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--optimizer", required=True)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--decoupled-lr", type=float,
                   help="train the embedding and output layer at this lr (Megatron's "
                        "--decoupled-lr), through the run's OptimizerParamScheduler")
    p.add_argument("--out", required=True)
    p.add_argument("--ef-resume", metavar="DIR",
                   help="instead: error feedback, 4 steps straight vs 2 + save to DIR + load + 2")
    a = p.parse_args(argv)

    from megatron.core import parallel_state

    from megatron_asyncmesh import distributed as mdist
    from megatron_asyncmesh.optim import builder as optim
    from megatron_asyncmesh.dataparallel.megatron import wrap_ddp
    from megatron_asyncmesh.model import build_gpt_stage, init_layout_independent

    cfg = cfg_for(a.optimizer)
    cfg.decoupled_lr = a.decoupled_lr
    cfg.validate()
    mdist.init_distributed()
    torch.set_num_threads(1)
    mdist.init_model_parallel(cfg)
    if a.ef_resume:
        return ef_resume(cfg, a.ef_resume, a.out)
    model = build_gpt_stage(cfg, VOCAB)
    init_layout_independent(model, cfg)
    ref = build_gpt_stage(cfg, VOCAB)
    init_layout_independent(ref, cfg)
    ddp = wrap_ddp(cfg, model)
    optimizer, info = optim.build_optimizer(cfg, ddp, 0, 1, 1)
    if a.decoupled_lr is not None:     # the run's scheduler sets each group's lr
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
        OptimizerParamScheduler(
            optimizer, init_lr=0.0, max_lr=cfg.lr, min_lr=cfg.min_lr, lr_warmup_steps=0,
            lr_decay_steps=10, lr_decay_style="constant", start_wd=cfg.weight_decay,
            end_wd=cfg.weight_decay, wd_incr_steps=10, wd_incr_style="constant")

    def lr_of(name: str) -> float:     # what the reference trains each tensor at
        edge = "embedding" in name or "output_layer" in name
        return a.decoupled_lr if edge and a.decoupled_lr is not None else cfg.lr

    name_of = {id(p): n for n, p in model.named_parameters()}
    ref_params = dict(ref.named_parameters())
    groups, kinds = [], {}
    for g in optimizer.param_groups:
        names = [name_of[id(q)] for q in g["params"]]
        for kind in ("matrix", "other"):
            chosen = [n for n in names
                      if (kind == "matrix") == (ref_params[n].dim() == 2
                                                and "embedding" not in n
                                                and "output_layer" not in n)]
            for lr in sorted({lr_of(n) for n in chosen}):
                at_lr = [n for n in chosen if lr_of(n) == lr]
                groups.append(([ref_params[n] for n in at_lr], g["weight_decay"], kind, lr))
                kinds.update({n: kind for n in at_lr})
    assert sorted(kinds) == sorted(ref_params), "every parameter is in one Megatron group"
    refs = reference_optimizers(a.optimizer, cfg, groups)

    initial = {n: q.detach().clone() for n, q in ref_params.items()}
    diffs = []
    for t in range(a.steps):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        loss_of(ddp, t).backward()
        ddp.finish_grad_sync()
        ok, _, _ = optimizer.step()
        assert ok
        for o in refs:
            o.zero_grad()
        loss_of(ref, t).backward()
        for o in refs:
            o.step()
        own = dict(model.named_parameters())
        if os.environ.get("OPTIM_WORKER_DEBUG"):
            print({n: (own[n].detach() - r.detach()).abs().max().item()
                   for n, r in ref_params.items()}, flush=True)
        diffs.append(max((own[n].detach() - r.detach()).abs().max().item()
                         for n, r in ref_params.items()))
    moved = max((own[n].detach() - q).abs().max().item() for n, q in initial.items())
    inner = [getattr(o, "optimizer", o)
             for o in getattr(optimizer, "chained_optimizers", [optimizer])]
    with open(a.out, "w") as f:
        json.dump({"diffs": diffs, "moved": moved, "info": info.as_dict(),
                   "kinds": kinds,
                   "wrapper": type(optimizer).__name__,
                   "inner": [type(o).__name__ for o in inner],
                   "matmul_prec": sorted({getattr(o, "fp32_matmul_prec", "-") for o in inner})},
                  f)
    parallel_state.destroy_model_parallel()
    return 0


def ef_resume(cfg, ckpt_dir: str, out: str) -> int:
    """Error feedback's buffer through Megatron's dist_checkpointing: a fresh model and
    optimizer loaded after 2 steps continue exactly like 4 steps straight."""
    from megatron.core import dist_checkpointing, parallel_state

    from megatron_asyncmesh.optim import builder as optim
    from megatron_asyncmesh.dataparallel.megatron import wrap_ddp
    from megatron_asyncmesh.model import build_gpt_stage, init_layout_independent
    from megatron_asyncmesh.optim.feedback import DelayErrorFeedback

    def make():
        m = build_gpt_stage(cfg, VOCAB)
        init_layout_independent(m, cfg)
        d = wrap_ddp(cfg, m)
        o, _ = optim.build_optimizer(cfg, d, 0, 1, 1)
        return m, d, DelayErrorFeedback(o, list(d.parameters()), 0.5)

    def step(d, o, t):
        d.zero_grad_buffer()
        o.zero_grad()
        loss_of(d, t).backward()
        d.finish_grad_sync()
        assert o.step()[0]

    def sharded(m, o, loading):
        msd = m.sharded_state_dict()
        return {"model": msd, "optimizer": o.sharded_state_dict(msd, is_loading=loading)}

    m1, d1, o1 = make()
    for t in range(4):
        step(d1, o1, t)
    m2, d2, o2 = make()
    for t in range(2):
        step(d2, o2, t)
    os.makedirs(ckpt_dir, exist_ok=True)
    dist_checkpointing.save(sharded(m2, o2, False), ckpt_dir)
    m3, d3, o3 = make()
    state = dist_checkpointing.load(sharded(m3, o3, True), ckpt_dir)
    m3.load_state_dict(state["model"])
    o3.load_state_dict(state["optimizer"])
    assert o3.previous is not None
    for t in range(2, 4):
        step(d3, o3, t)
    p1, p3 = dict(m1.named_parameters()), dict(m3.named_parameters())
    diff = max((p1[n].detach() - p3[n].detach()).abs().max().item() for n in p1)
    # without the buffer, the first resumed step would skip the correction
    m4, d4, o4 = make()
    m4.load_state_dict(state["model"])
    for t in range(2, 4):
        step(d4, o4, t)
    p4 = dict(m4.named_parameters())
    diff_without = max((p1[n].detach() - p4[n].detach()).abs().max().item() for n in p1)
    with open(out, "w") as f:
        json.dump({"diff": diff, "diff_without_state": diff_without}, f)
    parallel_state.destroy_model_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
