"""The DeepSpeed engine: the same GPT and data on ``deepspeed.initialize`` (ZeRO baselines
and AsyncMesh for DeepSpeed), one optimizer step per :meth:`DeepSpeedEngineRun.train_step`.

The model is the Megatron-core ``GPTModel`` of the Megatron engine (PP = 1, same
layout-independent initialisation), the data the same ``GPTDataset`` samples in the same
order, the optimizer torch's AdamW with Megatron's parameter groups (no weight decay on
biases and norms) and Megatron's warm-up + cosine schedule. ZeRO is DeepSpeed's own. With
``--dp-averaging sparse`` the engine gets ``mpu=ReplicaMPU()`` and
:func:`attach_sparse_averaging` (ZeRO stage 0 or 1). Every collective DeepSpeed issues
goes through ``deepspeed.comm``, whose comms logger counts the bytes.
"""

from __future__ import annotations

import inspect
import math
import time

import torch
import torch.distributed as dist

from megatron_asyncmesh import distributed as mdist
from megatron_asyncmesh import patching
from megatron_asyncmesh.checkpoint.deepspeed import check_zero_resume, save_zero_checkpoint
from megatron_asyncmesh.dataparallel.config import averaging_config
from megatron_asyncmesh.dataparallel.consensus import consensus
from megatron_asyncmesh.dataparallel.deepspeed_hook import ReplicaMPU, attach_sparse_averaging
from megatron_asyncmesh.dataparallel.replicas import replica_layout
from megatron_asyncmesh.model import build_gpt_stage, global_parameter_names, \
    init_layout_independent
from megatron_asyncmesh.options import ConfigError
from megatron_asyncmesh.runner.reduce import world_mean_loss

COUNT_PATCH = patching.declare(
    "deepspeed-comm-bytes", package="deepspeed",
    target="`deepspeed.comm.{all_reduce, reduce_scatter_tensor, all_gather_into_tensor, "
           "broadcast, ...}` (module functions, in `deepspeed.comm` and `deepspeed.comm.comm`)",
    replacement="the same functions, adding each call's message size to a counter",
    why="bytes per collective for the benchmarks without DeepSpeed's comms logger, which "
        "synchronises the device after every collective",
    when="a train_deepspeed run (`CommBytes.install()` .. `uninstall()`)")
# Collectives ZeRO 1/2/3 and the averager issue, whose bytes are counted.
LOGGED_OPS = ["all_reduce", "all_reduce_coalesced", "reduce_scatter", "reduce_scatter_tensor",
              "all_gather", "all_gather_into_tensor", "broadcast", "reduce",
              "all_to_all_single"]


def megatron_lr(cfg, step: int, peak: float, floor: float) -> float:
    """Megatron's OptimizerParamScheduler (linear warm-up from 0 to ``peak``, then
    cosine/linear decay to ``floor``: a parameter group's max_lr / min_lr) as a function
    of completed optimizer steps."""
    warmup, decay = cfg.lr_warmup_iters, cfg.lr_decay_iters or cfg.train_iters
    if warmup > 0 and step <= warmup:
        return peak * step / warmup
    if cfg.lr_decay_style == "constant":
        return peak
    if step > decay:
        return floor
    ratio = (step - warmup) / max(1, decay - warmup)
    coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0) if cfg.lr_decay_style == "cosine" \
        else 1.0 - ratio
    return floor + coeff * (peak - floor)


def param_groups(model, cfg):
    """Megatron's default groups: no weight decay on biases and 1-d parameters; with
    --decoupled-lr the input embedding and output layer (Megatron's
    ``is_embedding_or_output_parameter``) in groups of their own, whose ``max_lr`` /
    ``min_lr`` the schedule follows (:func:`schedule_lambdas`)."""
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = not (name.endswith(".bias") or p.dim() == 1)
        edge = cfg.decoupled_lr is not None and getattr(p, "is_embedding_or_output_parameter",
                                                        False)
        groups.setdefault((decay, edge), []).append(p)
    out = []
    for (decay, edge), params in sorted(groups.items(), key=lambda kv: (not kv[0][0], kv[0][1])):
        peak, floor = ((cfg.decoupled_lr, cfg.resolved_decoupled_min_lr()) if edge
                       else (cfg.lr, cfg.min_lr))
        out.append({"params": params, "weight_decay": cfg.weight_decay if decay else 0.0,
                    "lr": peak, "max_lr": peak, "min_lr": floor})
    return out


def schedule_lambdas(cfg, groups):
    """One LambdaLR factor per group: Megatron's schedule between its max_lr and min_lr,
    relative to the group's initial lr (its max_lr)."""
    return [lambda step, peak=g["max_lr"], floor=g["min_lr"]:
            megatron_lr(cfg, step, peak, floor) / peak for g in groups]


def ds_config(cfg, zero_stage: int, num_microbatches: int) -> dict:
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


class CommBytes:
    """Bytes handed to each ``deepspeed.comm`` collective, counted from the tensor
    arguments (DeepSpeed's own ``get_msg_size_from_args``, the comms logger's measure)
    without its timing: the comms logger synchronises the device after every collective
    once enabled (``timed_op``), which would remove ZeRO's overlap of communication and
    compute, and the averager's asynchrony, from every run it measures."""

    def __init__(self):
        self.by_op = {}
        self._originals = {}

    def install(self) -> "CommBytes":
        import deepspeed.comm as dscomm
        from deepspeed.comm import comm as dscomm_impl
        from deepspeed.comm.utils import get_msg_size_from_args, get_tensor_position

        for op in LOGGED_OPS:
            original = getattr(dscomm_impl, op, None)
            if original is None:
                continue
            # deepspeed.comm's functions are wrapped by its timed_op (a bare *args,
            # **kwargs signature): the sizes are read against the function it wraps.
            signed = next((c.cell_contents for c in (original.__closure__ or ())
                           if inspect.isfunction(c.cell_contents)), original)
            # Where the tensor argument sits, found once (DeepSpeed's helper inspects the
            # signature on every call); passed by keyword, its helper finds it.
            position = get_tensor_position(signed)

            def counted(*args, _op=op, _fn=original, _signed=signed, _pos=position,
                        **kwargs):
                if 0 <= _pos < len(args) and isinstance(args[_pos], torch.Tensor):
                    size = args[_pos].element_size() * args[_pos].nelement()
                else:
                    size = get_msg_size_from_args(_signed, *args, **kwargs)
                self.by_op[_op] = self.by_op.get(_op, 0) + size
                return _fn(*args, **kwargs)

            # Both the package's names (what callers use) and the implementation module's
            # (what its own helpers, e.g. ZeRO-3's reduce_scatter_fn, call).
            for module in (dscomm, dscomm_impl):
                self._originals[(module, op)] = patching.replace(module, op, counted,
                                                                 patch=COUNT_PATCH)
        return self

    def uninstall(self) -> None:
        for (module, op), fn in self._originals.items():
            patching.restore(module, op, fn, patch=COUNT_PATCH)
        self._originals = {}

    def total(self) -> int:
        return sum(self.by_op.values())


def check_options(cfg, zero_stage: int) -> None:
    """What the DeepSpeed engine cannot run, refused before any process group exists."""
    if cfg.pipeline_model_parallel_size != 1:
        raise ConfigError(
            f"train_deepspeed runs data parallelism only (--pipeline-model-parallel-size 1, "
            f"got {cfg.pipeline_model_parallel_size}); pipelines run with "
            f"asyncmesh-train.")
    if cfg.optimizer not in ("adam", "sgd"):
        raise ConfigError(
            f"train_deepspeed trains with torch's AdamW (--optimizer adam) or SGD "
            f"(--optimizer sgd), got --optimizer {cfg.optimizer}; the look-ahead optimizers "
            f"run with asyncmesh-train.")
    if zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"--zero-stage must be 0, 1, 2 or 3, got {zero_stage}.")
    sparse = averaging_config(cfg, cfg.seed, cfg.train_iters) is not None
    if sparse and zero_stage >= 2:
        raise ConfigError(
            f"--dp-averaging sparse cannot be combined with --zero-stage {zero_stage}: ZeRO-2 "
            f"reduce-scatters gradients from backward hooks and keeps a slice of each "
            f"gradient, ZeRO-3 a slice of each parameter, so there are no independent whole "
            f"replicas to average. Use --zero-stage 0 or 1.")
    if sparse and cfg.dp_ranks_per_replica > 1 and zero_stage != 1:
        raise ConfigError(
            f"--dp-ranks-per-replica {cfg.dp_ranks_per_replica} on a DeepSpeed engine needs "
            f"--zero-stage 1 (ZeRO-1 over each replica, its gradient exchange inside it); "
            f"got --zero-stage {zero_stage}.")
    if (cfg.save or cfg.load) and sparse:
        raise ConfigError(
            f"train_deepspeed {'--save' if cfg.save else '--load'} with --dp-averaging sparse: "
            f"a DeepSpeed checkpoint holds one model for all data-parallel ranks, and sparse "
            f"replicas differ (each with its own pending averages). Save and resume sparse "
            f"runs with asyncmesh-train.")


class DeepSpeedEngineRun:
    """Training on a DeepSpeed engine (``train_deepspeed``): data parallelism with ZeRO
    stage 0-3, or sparse averaging between replicas (one rank, or ZeRO-1 over
    ``--dp-ranks-per-replica`` ranks)."""

    name = "deepspeed"

    @staticmethod
    def needs_data() -> bool:
        return True

    def __init__(self, cfg, dp: int, num_microbatches: int, data, zero_stage: int):
        import deepspeed

        self.cfg, self.dp, self.num_microbatches = cfg, dp, num_microbatches
        self.zero_stage = zero_stage
        mdist.init_deepspeed_comm()
        self.comm = CommBytes().install()
        acfg = averaging_config(cfg, cfg.seed, cfg.train_iters)
        model = build_gpt_stage(cfg, data.vocab_size)
        init_layout_independent(model, cfg)
        names = global_parameter_names(model)
        self.model = model
        # A checkpoint that cannot resume here is refused before the engine is built.
        self.start_iter = (check_zero_resume(cfg, zero_stage, model.vocab_size, dp)
                           if cfg.load else 0)
        groups = param_groups(model, cfg)
        if cfg.optimizer == "adam":
            optimizer = torch.optim.AdamW(groups, lr=cfg.lr,
                                          betas=(cfg.adam_beta1, cfg.adam_beta2),
                                          eps=cfg.adam_eps)
        else:   # Megatron's SGD: L2 weight decay, momentum
            optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.sgd_momentum)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule_lambdas(cfg, groups))
        mpu = layout = None
        if acfg is not None:         # ZeRO-1 (or nothing) inside the replica, averaging across
            layout = replica_layout(cfg.dp_ranks_per_replica)
            mpu = ReplicaMPU(layout.replica_group, layout.table_ranks("replica_group"))
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler,
            config=ds_config(cfg, zero_stage, num_microbatches), mpu=mpu)
        self.averager = attach_sparse_averaging(
            self.engine, acfg, group=layout.averaging_group, names=names,
            ranks_per_replica=layout.ranks_per_replica) if acfg else None
        if layout is not None and dist.get_rank() == 0:
            print(layout.describe(), flush=True)
        self.load_s = None
        if cfg.load:
            # DeepSpeed restores the module, the (ZeRO-partitioned) optimizer state and the
            # lr scheduler; the data position follows from the iteration.
            t0 = time.perf_counter()
            path, client = self.engine.load_checkpoint(cfg.load)
            self.load_s = time.perf_counter() - t0
            if path is None or (client or {}).get("iteration") != self.start_iter:
                raise ConfigError(f"--load {cfg.load!r}: DeepSpeed could not load iteration "
                                  f"{self.start_iter} (got {path!r}).")
        self.device = torch.device("cuda") if torch.cuda.is_available() \
            else torch.device("cpu")
        self.asynchronous = False            # no pipeline
        self.pipeline_schedule = "none"
        self.synchronous = self.averager is None
        # Every rank reports the same global norm (one per replica when averaging).
        self.norm_replicas = dist.get_world_size()
        self.optimizer_name = f"{cfg.optimizer} (torch, DeepSpeed engine)"
        self._bytes_after_first = None
        self._first = True

    def _loss_of(self, batch):
        d = self.device
        out = self.engine(batch["tokens"].to(d), batch["position_ids"].to(d), None,
                          labels=batch["labels"].to(d))
        mask = batch["loss_mask"].to(d).float()
        return (out.float() * mask).sum() / mask.sum().clamp(min=1.0), mask.sum()

    def train_step(self, data_iterator, step: int, drain: bool) -> dict:
        engine = self.engine
        loss_sum = tokens = 0.0
        lr = engine.get_lr()[0]
        sent_before = self.averager.bytes_sent if self.averager else 0
        for _ in range(self.num_microbatches):
            loss, n = self._loss_of(next(data_iterator))
            engine.backward(loss)
            engine.step()
            loss_sum += float(loss) * float(n)
            tokens += float(n)
        norm = engine.get_global_grad_norm()
        steady = not self._first
        if self._first:
            self._bytes_after_first = self.comm.total()
            self._first = False
        return {"loss_sum": loss_sum, "tokens": tokens,
                "grad_norm_sq": None if norm is None else float(norm) ** 2, "lr": lr,
                "dp_bytes_sent": (self.averager.bytes_sent - sent_before
                                  if self.averager else 0),
                "steady": steady}

    @torch.no_grad()
    def evaluate(self, valid) -> float:
        self.engine.eval()
        loss_sum = tokens = 0.0
        for batch in valid or []:
            loss, n = self._loss_of(batch)
            loss_sum += float(loss) * float(n)
            tokens += float(n)
        self.engine.train()
        return world_mean_loss(loss_sum, tokens)

    def consensus_evaluate(self, valid):
        """(validation loss of the replicas' mean, bytes sent) with sparse averaging
        (every rank a replica); None otherwise."""
        if self.averager is None:
            return None
        params = [p for p in self.engine.module.parameters() if p.requires_grad]
        with consensus(params, None) as sent:
            loss = self.evaluate(valid)
        return loss, sent

    def final_average(self):
        """The DeepSpeed engine's sparse runs do not save (see check_options): their
        replicas are evaluated as one model (consensus_evaluate), not merged."""
        return None

    def save(self, step: int) -> None:
        save_zero_checkpoint(self.cfg, self.engine, self.zero_stage, self.model.vocab_size,
                             step, self.dp)

    def close(self) -> None:
        if self.averager is not None:
            self.averager.wait_in_flight()
        self.comm.uninstall()

    def rank_info(self, steps: int) -> dict:
        by_op = dict(self.comm.by_op)
        total = self.comm.total()
        params = sum(p.numel() for p in self.model.parameters())
        per_step = ((total - self._bytes_after_first) / max(1, steps - 1)
                    if self._bytes_after_first is not None else None)
        return {"stage_optimizer": {"optimizer": self.cfg.optimizer, "stage": 0,
                                    "delay": 0.0},
                "dp_averaging_stats": (self.averager.stats() if self.averager is not None
                                       else None),
                # DeepSpeed's gradient exchange is inside comm_bytes_per_step.
                "grad_all_reduce_bytes_per_step": None,
                "comm_bytes_by_op": by_op, "comm_bytes_per_step": per_step,
                "parameters": params, "replica": dist.get_rank()}

    def pipeline(self) -> dict:
        """No pipeline: one stage, no delay, utilization not measured."""
        return {"stage_utilization": {"0": None}, "stage_delay": {"0": {"mean": 0.0,
                                                                           "max": 0}},
                "per_rank": [{"rank": r, "stage": 0, "mode": "none"}
                             for r in range(dist.get_world_size())],
                "windows": None}

    def plot(self, run_dir: str, pipeline: dict) -> None:
        return None
