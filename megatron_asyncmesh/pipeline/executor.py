"""Execute a stage's action list on Megatron-core: the asynchronous schedule.

``AsyncPipelineSchedule`` has the signature of Megatron's
``forward_backward_pipelining_without_interleaving`` and keeps its contract:
``forward_step_func(data_iterator, model) -> (output, loss_func)``, losses
returned as Megatron returns them (last stage), gradients left in DDP's
``main_grad`` and finalized by ``config.finalize_model_grads_func``, after
which the caller runs ``optimizer.step()``. It uses Megatron's own pieces:
``P2PCommunicator`` for every send/receive, ``schedules.forward_step`` /
``schedules.backward_step`` for compute, ``deallocate_output_tensor``.

The difference is state: one call is one optimizer step of this stage, but
the pipeline stays full between calls. Call t runs the backwards of the
microbatches of step t and the forwards that the 1F1B stream interleaves
with them, which belong to step t + 1 at all but the last stage (the warm-up
runs once per segment). The data iterator must therefore be the same
persistent iterator on every call, as in Megatron-LM's training loop.
The pipeline drains (cool-down, no forwards run ahead) on the call after
``request_drain()``, on the last of ``train_iters`` steps, or every
``drain_interval`` steps; evaluation (``forward_only=True``) and
checkpoints need a drained pipeline.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from typing import Dict, List, Optional

import torch

from megatron_asyncmesh.pipeline.schedule import (
    ASYNC_MODES, MODES, RECV_B, RECV_F, SEND_B, SEND_F, ScheduleError, check, needs_snapshot,
    resume_versions, step_actions, weight_version)
from megatron_asyncmesh.pipeline.timeline import Timeline
from megatron_asyncmesh.pipeline.versions import WeightVersionStore


class PipelineStateError(RuntimeError):
    pass


class AsyncPipelineSchedule:
    """Megatron forward_backward function for ``flush``, ``2bw`` and ``stash``.

    ``flush`` through this executor reproduces Megatron's own schedule call
    for call (tested against it); training with ``--pipeline-schedule flush``
    uses Megatron's function itself.
    """

    def __init__(self, mode: str, train_iters: Optional[int] = None,
                 drain_interval: Optional[int] = None, start_step: int = 0):
        if mode not in MODES:
            raise ScheduleError(f"unknown pipeline schedule {mode!r}; choose one of "
                                f"{', '.join(MODES)}.")
        self.mode = mode
        self.train_iters = train_iters
        self.drain_interval = drain_interval
        self.step = start_step             # optimizer steps done by this stage
        self.segment_start: Optional[int] = None
        self._drain_requested = False
        self.num_microbatches: Optional[int] = None
        self.store: Optional[WeightVersionStore] = None
        self.timeline: Optional[Timeline] = None   # set by the training loop to record COMM
        self.last_call = (False, False)            # (first, last) of its segment
        self.delays: List[int] = []        # measured per backward: step applied - version used
        self.peak_in_flight = 0
        self._setup_done = False
        self._forwarded = -1               # highest microbatch forwarded so far
        # In-flight state kept across calls, keyed by global microbatch id:
        # received activations, stage outputs, received output gradients,
        # input gradients to send back, and the weight version each one used.
        self._inputs: Dict[int, torch.Tensor] = {}
        self._outputs: Dict[int, torch.Tensor] = {}
        self._out_grads: Dict[int, torch.Tensor] = {}
        self._in_grads: Dict[int, torch.Tensor] = {}
        self._versions: Dict[int, int] = {}
        # Megatron's functions this object stands in for (set by install.patch()).
        self.megatron_functions: Dict[str, object] = {}
        self._restored: Dict[int, List[torch.Tensor]] = {}

    # -- checkpoints -----------------------------------------------------------
    def held_versions(self) -> Dict[int, List[torch.Tensor]]:
        """The weights (parameter order) of every older version the next step's
        microbatches run on (:func:`schedule.resume_versions`): what a checkpoint of
        the drained pipeline must hold besides the live weights."""
        if not self.drained:
            raise PipelineStateError(
                "a checkpoint needs a drained pipeline: microbatches of the next step are "
                "in flight. Call schedule.request_drain() before the step preceding it.")
        if not self._setup_done:           # resumed, no step taken yet
            return dict(self._restored)
        versions = resume_versions(self.mode, self.P, self.stage, self.num_microbatches,
                                   self.step)
        missing = [v for v in versions if v not in self.store.snapshots]
        if missing:
            raise PipelineStateError(
                f"weight versions {missing} are not held by stage {self.stage} at step "
                f"{self.step} (held: {sorted(self.store.snapshots)}).")
        return {v: self.store.snapshots[v] for v in versions}

    def restore_versions(self, versions: Dict[int, List[torch.Tensor]]) -> None:
        """Weight versions loaded from a checkpoint; put in the store at the first call."""
        self._restored = {v: list(ts) for v, ts in versions.items()}

    # -- control -------------------------------------------------------------
    @property
    def drained(self) -> bool:
        return self.segment_start is None

    def request_drain(self) -> None:
        """The next call is the last of its segment: no forward runs ahead."""
        self._drain_requested = True

    def _is_last_of_segment(self, t: int) -> bool:
        if self.mode == "flush" or self._drain_requested:
            return True
        if self.train_iters is not None and t + 1 >= self.train_iters:
            return True
        return bool(self.drain_interval) and (t + 1) % self.drain_interval == 0

    # -- set-up ----------------------------------------------------------------
    def _setup(self, model, num_microbatches: int) -> None:
        from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator
        from megatron.core.pipeline_parallel.schedules import _build_default_pg_collection
        from megatron.core.utils import get_model_config

        config = get_model_config(model)
        if config.calculate_per_token_loss and self.mode in ASYNC_MODES:
            raise ScheduleError("calculate_per_token_loss needs a token count broadcast across "
                                "pipeline stages every step; use the default per-microbatch "
                                "loss normalisation with asynchronous schedules.")
        if config.overlap_p2p_comm:
            raise ScheduleError("overlap_p2p_comm is for interleaved schedules; turn it off.")
        self.config = config
        self.pg = _build_default_pg_collection()
        self.comm = P2PCommunicator(pp_group=self.pg.pp, config=config)
        self.P = self.comm.total_stages
        self.stage = self.comm.current_stage
        self.first, self.last = self.comm.is_pp_first_stage, self.comm.is_pp_last_stage
        check(self.mode, self.P, num_microbatches, self.stage)
        if self.mode in ASYNC_MODES and self.P > 1:
            inner = model
            while hasattr(inner, "module"):
                inner = inner.module
            if getattr(inner, "share_embeddings_and_output_weights", False):
                raise ScheduleError(
                    "the input embedding and the output layer are tied across the first and "
                    "last pipeline stages; their gradients would be all-reduced between two "
                    "stages every step, which re-synchronises the pipeline (and mixes weight "
                    "versions). Pass --untie-embeddings-and-output-weights with "
                    f"--pipeline-schedule {self.mode}.")
        self.num_microbatches = num_microbatches
        params = [p for p in model.parameters() if p.requires_grad]
        # Megatron's distributed optimizer writes into DDP's flat buffer, which the
        # parameters view: their storage cannot be swapped (see versions.py).
        flat = getattr(getattr(model, "ddp_config", None), "use_distributed_optimizer", False)
        self.store = WeightVersionStore(params, needs_snapshot(self.mode, self.P, self.stage),
                                        swap=not flat)
        for v, tensors in self._restored.items():
            self.store.restore(v, tensors)
        self._restored = {}
        self.cp_size = self.pg.cp.size()
        self._setup_done = True

    def tensor_shapes(self, seq_length, micro_batch_size, decoder_seq_length):
        from megatron.core.pipeline_parallel.schedules import get_tensor_shapes

        return get_tensor_shapes(seq_length=seq_length, micro_batch_size=micro_batch_size,
                                 decoder_seq_length=decoder_seq_length, config=self.config,
                                 tp_group=self.pg.tp, cp_group=self.pg.cp)[0]

    # -- the forward_backward function --------------------------------------------
    def __call__(self, *, forward_step_func, data_iterator, model, num_microbatches: int,
                 seq_length: int, micro_batch_size: int, decoder_seq_length=None,
                 forward_only: bool = False, collect_non_loss_data: bool = False,
                 first_val_step=None, adjust_tensor_shapes_fn=None, p2p_communicator=None,
                 pg_collection=None, force_all_reduce: bool = False):
        from megatron.core.pipeline_parallel import schedules

        if isinstance(model, list):
            if len(model) != 1:
                raise ScheduleError("asynchronous schedules do not support virtual pipeline "
                                    "stages (model chunks); pass one model.")
            model = model[0]
        if isinstance(data_iterator, list):
            data_iterator = data_iterator[0]
        if forward_only:
            if not self.drained:
                raise PipelineStateError(
                    "evaluation with a full pipeline: microbatches of the next step are in "
                    "flight. Call schedule.request_drain() before the last training step "
                    "preceding evaluation (the training entry point does this).")
            if self.store is not None:
                self.store.point_to_live()
            return self._megatron_func()(
                forward_step_func=forward_step_func, data_iterator=data_iterator, model=model,
                num_microbatches=num_microbatches, seq_length=seq_length,
                micro_batch_size=micro_batch_size, decoder_seq_length=decoder_seq_length,
                forward_only=True, collect_non_loss_data=collect_non_loss_data,
                first_val_step=first_val_step)
        if adjust_tensor_shapes_fn is not None or p2p_communicator is not None:
            raise ScheduleError("custom tensor shapes / communicators are not supported by "
                                "the asynchronous schedule.")
        if not self._setup_done:
            self._setup(model, num_microbatches)
        elif num_microbatches != self.num_microbatches:
            raise ScheduleError(f"num_microbatches changed from {self.num_microbatches} to "
                                f"{num_microbatches}; the asynchronous pipeline keeps "
                                "microbatches of the next step in flight, so it must be fixed.")
        shape = self.tensor_shapes(seq_length, micro_batch_size, decoder_seq_length)
        t = self.step
        M = self.num_microbatches
        if self.segment_start is None:
            self.segment_start = t
            self._forwarded = t * M - 1
        last = self._is_last_of_segment(t)
        actions = step_actions(self.mode, self.P, self.stage, M, self.segment_start, t, last)
        # The live weights are version t now; keep what future microbatches use.
        self.store.on_version(t, weight_version(self.mode, self.P, self.stage, M,
                                                self._forwarded + 1))
        losses = self._run(actions, schedules, forward_step_func, data_iterator, model, shape,
                           collect_non_loss_data, force_all_reduce)
        self.store.point_to_live()
        # Before the optimizer step: keep the live version if anything still needs it.
        self.store.retire_live(weight_version(self.mode, self.P, self.stage, M,
                                              self._forwarded + 1))
        self.last_call = (t == self.segment_start, last)
        self.step = t + 1
        if last:
            self.segment_start = None
            self._drain_requested = False
        return losses

    def _megatron_func(self):
        """Megatron's own function for this pipeline size: the one ``install.patch()``
        replaced with this object, or the module's current one when not installed."""
        from megatron.core import parallel_state
        from megatron.core.pipeline_parallel import schedules

        name = ("forward_backward_pipelining_without_interleaving"
                if parallel_state.get_pipeline_model_parallel_world_size() > 1
                else "forward_backward_no_pipelining")
        return self.megatron_functions.get(name) or getattr(schedules, name)

    # -- executor ----------------------------------------------------------------
    def _run(self, actions, schedules, forward_step_func, data_iterator, model, shape,
             collect_non_loss_data, force_all_reduce):
        config, store, tl = self.config, self.store, self.timeline
        M = self.num_microbatches
        inputs, outputs, versions = self._inputs, self._outputs, self._versions
        out_grads, in_grads = self._out_grads, self._in_grads
        forward_data_store: List = []
        last_backward = max(a.microbatch for a in actions if a.kind == "B")
        no_sync = (config.no_sync_func or contextlib.nullcontext)()
        no_sync.__enter__()
        synced = False
        switched = False
        try:
            for a in actions:
                t0 = time.time()
                if a.kind == "W":
                    store.point_to(a.version)
                    switched = True
                    continue
                if a.kind == "STEP":
                    break
                if a.kind == "F":
                    j = a.microbatch
                    with store.stash_hooks():
                        out, _ = schedules.forward_step(
                            forward_step_func, data_iterator, model, M, inputs.get(j),
                            forward_data_store, config, self.cp_size,
                            collect_non_loss_data=collect_non_loss_data,
                            is_first_microbatch=switched or j % M == 0,
                            current_microbatch=j % M, is_last_stage=self.last)
                    switched = False
                    outputs[j] = out
                    versions[j] = a.version
                    store.acquire(a.version)
                    self._forwarded = max(self._forwarded, j)
                    self.peak_in_flight = max(self.peak_in_flight, len(outputs))
                elif a.kind == "B":
                    j = a.microbatch
                    if j == last_backward and not synced:
                        no_sync.__exit__(None, None, None)   # grad sync on the last backward
                        synced = True
                    grad = schedules.backward_step(inputs.pop(j, None), outputs.pop(j),
                                                   out_grads.pop(j, None), config)
                    if not self.first:
                        in_grads[j] = grad
                    store.release(versions[j])
                    self.delays.append(j // M - versions.pop(j))
                else:
                    self._communicate(a.ops, inputs, outputs, out_grads, in_grads, shape)
                    if tl is not None:
                        tl.add("COMM", t0, time.time())
        finally:
            if not synced:
                no_sync.__exit__(None, None, None)
        if config.finalize_model_grads_func is not None:
            config.finalize_model_grads_func([model], None, force_all_reduce=force_all_reduce)
        return forward_data_store

    def _communicate(self, ops, inputs, outputs, out_grads, in_grads, shape) -> None:
        """One Megatron P2PCommunicator call for the set of ops (all blocking)."""
        from megatron.core.pipeline_parallel.schedules import deallocate_output_tensor

        comm, config = self.comm, self.config
        kinds = tuple(sorted(op for op, _ in ops))
        mb = {op: j for op, j in ops}
        if kinds == (RECV_F,):
            inputs[mb[RECV_F]] = comm.recv_forward(shape, False)
        elif kinds == (SEND_F,):
            comm.send_forward(outputs[mb[SEND_F]], False)
        elif kinds == (RECV_B,):
            out_grads[mb[RECV_B]] = comm.recv_backward(shape, False)
        elif kinds == (SEND_B,):
            comm.send_backward(in_grads.pop(mb[SEND_B]), False)
        elif kinds == (RECV_B, SEND_F):
            out_grads[mb[RECV_B]] = comm.send_forward_recv_backward(
                outputs[mb[SEND_F]], shape, False)
        elif kinds == (RECV_F, SEND_B):
            inputs[mb[RECV_F]] = comm.send_backward_recv_forward(
                in_grads.pop(mb[SEND_B]), shape, False)
        else:
            raise ScheduleError(f"no P2PCommunicator call for ops {ops}")
        if SEND_F in mb:
            # The activation has been sent; keep only its autograd graph (Megatron's
            # pseudo-free, see deallocate_output_tensor's docstring).
            deallocate_output_tensor(outputs[mb[SEND_F]], config.deallocate_pipeline_outputs)

    # -- reporting -----------------------------------------------------------------
    def stats(self) -> dict:
        delays = self.delays
        return {
            "mode": self.mode, "stage": getattr(self, "stage", None),
            "delay_mean": (sum(delays) / len(delays)) if delays else None,
            "delay_max": max(delays) if delays else None,
            "delay_histogram": dict(sorted(_hist(delays).items())),
            "peak_in_flight_microbatches": self.peak_in_flight,
            "weight_versions": self.store.state() if self.store else None,
        }


def _hist(values) -> Dict[int, int]:
    h: Dict[int, int] = defaultdict(int)
    for v in values:
        h[v] += 1
    return dict(h)
