"""Asynchronous sparse parameter averaging across data-parallel replicas (AsyncMesh).

Replicas of a pipeline stage never all-reduce gradients. After every optimizer
step ``t`` each replica

1. selects the coordinates ``S_t`` of every tensor (the same ones on every
   replica: the selection is a pure function of a shared seed, the tensor's
   layout-independent name and ``t``),
2. copies ``W_i[S_t]`` into a snapshot and starts a non-blocking
   all-reduce of it over the stage's data-parallel group
   (``deepspeed.comm.all_reduce(..., async_op=True)``) and keeps training,
3. ``tau`` steps later waits for that all-reduce (long finished, normally)
   and writes the average ``A`` back with a correction for what the replica
   learnt meanwhile, its drift ``D_i = W_i^(t+tau)[S] - W_i^(t)[S]``:

   - ``avg``   (AsyncSPARTA):  ``W[S] <- A``
   - ``drift``:                ``W[S] <- A + lam D_i``
   - ``ema``   (AsyncMesh):    ``e[S] <- m e[S] + (1 - m) D_i``; ``W[S] <- A + lam e[S]``,
     ``e`` starts as the first drift seen by each coordinate, ``m`` is 0.5 and
     cosine-annealed to 0.99 from ``ema_start`` on.

An outer step (``outer_lr`` != 1 or ``outer_momentum`` > 0, beyond the paper, after
DiLoCo's outer Nesterov) treats the average as a pseudo-gradient: each replica keeps an
anchor ``Z`` (the consensus each coordinate got at its previous average; every replica
holds the same) and a momentum ``M``, and applies

   ``G = Z[S] - A``;  ``M[S] <- mu M[S] + G``;  ``Z[S] <- Z[S] - eta (G + mu M[S])``;
   ``W[S] <- Z[S] + lam e[S]`` (or ``+ lam D_i``, or nothing, per correction)

``eta = 1, mu = 0`` is the paper's step. ``eta > 1`` lengthens the averaged update:
the mean of the replicas' own (e.g. orthogonalised) updates is shorter than one
update on their mean gradient.

Order within a step (the averager's since its first version): this step's snapshot is
taken, then the averages now due are applied. A coordinate selected again while its
previous average is still in flight (at the start of each cycle, whose fresh
permutation overlaps the previous cycle's last ``tau`` groups; every step when
``N <= tau``) therefore has that average's jump in its next drift. Accounting for it
exactly (shifting the in-flight snapshots by each jump) was measured worse at
``mesh.yaml``'s p = 0.2, tau = 2 (+0.9 points on two seeds at 1000 steps); when it
happens every step the run degrades, which :meth:`AveragingConfig.overlap_note` says at
start-up (the README's "averages in flight").

``fraction = 1, delay = 0, avg`` is plain parameter averaging every step;
``delay = 0`` with random subsets is SPARTA. ``dense_iters`` (a synchronous warm
start) averages every parameter at once for the first steps, then the sparse
averaging takes over.

Selectors (ALGORITHMS.md section 3):

- ``block`` (the default): ``partition`` over contiguous blocks of
  ``block_size`` coordinates instead of single coordinates. The same coverage
  (every coordinate exactly once per cycle, the replicas agree), but every
  gather and scatter copies whole blocks sequentially and the cycle's
  permutation is ``block_size`` times smaller, so a step costs about what it
  sends.
- ``partition``: per tensor and per cycle a random permutation cut into
  ``N = ceil(1 / fraction)`` contiguous groups; step ``t`` takes group
  ``t mod N``, so every coordinate is averaged exactly once per cycle of N
  steps; a new permutation every cycle.
- ``bernoulli``: every coordinate independently with probability ``fraction``.

Everything each rank sends is counted (elements and bytes per step) so the
benchmark can set it against ZeRO's measured traffic; ``deepspeed.comm``'s
comms logger sees the same calls.
"""

from __future__ import annotations

import hashlib
import math
from collections import deque
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from megatron_asyncmesh.dataparallel.consensus import write_flat

CORRECTIONS = ("avg", "drift", "ema")
SELECTORS = ("block", "partition", "bernoulli")


class AveragingError(ValueError):
    """Bad averaging settings or replicas that disagree; the message names the fix."""


@dataclass
class AveragingConfig:
    fraction: float = 0.05
    delay: int = 10
    correction: str = "ema"
    selector: str = "block"
    block_size: int = 1024           # coordinates per block (block selector)
    lam: float = 1.0
    seed: int = 1234
    ema_start: int = 1000            # m stays at ema_momentum_start until this step
    ema_anneal_iters: int = 0        # cosine length; 0 = until the end of training
    ema_momentum_start: float = 0.5
    ema_momentum_end: float = 0.99
    train_iters: int = 0             # only to resolve ema_anneal_iters = 0
    dense_iters: int = 0             # steps 0 .. dense_iters-1: every parameter, tau = 0
    outer_lr: float = 1.0            # eta of the outer step (1 with mu = 0: none)
    outer_momentum: float = 0.0      # mu, Nesterov

    @property
    def outer(self) -> bool:
        return self.outer_lr != 1.0 or self.outer_momentum != 0.0

    def validate(self) -> "AveragingConfig":
        if not (isinstance(self.fraction, (int, float)) and 0.0 < self.fraction <= 1.0):
            raise AveragingError(
                f"--dp-fraction must be in (0, 1] (the share of each tensor averaged per "
                f"step, e.g. 0.05), got {self.fraction!r}.")
        if not isinstance(self.delay, int) or isinstance(self.delay, bool) or self.delay < 0:
            raise AveragingError(
                f"--dp-delay must be an integer >= 0 (steps between launching an average "
                f"and applying it; 0 = SPARTA), got {self.delay!r}.")
        if not (isinstance(self.lam, (int, float)) and 0.0 <= self.lam <= 4.0):
            raise AveragingError(
                f"--dp-lambda must be in [0, 4] (the weight of the drift correction: 1 = the "
                f"paper's, 0 = none, as --dp-correction avg), got {self.lam!r}.")
        if self.correction not in CORRECTIONS:
            raise AveragingError(f"--dp-correction must be one of {list(CORRECTIONS)}, got "
                                 f"{self.correction!r}.")
        if self.selector not in SELECTORS:
            raise AveragingError(f"--dp-selector must be one of {list(SELECTORS)}, got "
                                 f"{self.selector!r}.")
        if not isinstance(self.block_size, int) or isinstance(self.block_size, bool) or \
                self.block_size < 1:
            raise AveragingError(f"--dp-block-size must be an integer >= 1 (coordinates per "
                                 f"averaged block, e.g. 1024), got {self.block_size!r}.")
        for name in ("ema_momentum_start", "ema_momentum_end"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise AveragingError(f"{name} must be in [0, 1), got {getattr(self, name)}.")
        if not isinstance(self.dense_iters, int) or isinstance(self.dense_iters, bool) or \
                self.dense_iters < 0:
            raise AveragingError(f"--dp-dense-warmup-iters must be an integer >= 0 (steps of "
                                 f"dense synchronous averaging before the sparse one), got "
                                 f"{self.dense_iters!r}.")
        if not (isinstance(self.outer_lr, (int, float)) and 0.0 < self.outer_lr <= 4.0):
            raise AveragingError(
                f"--dp-outer-lr must be in (0, 4] (1 = the plain average; DiLoCo uses 0.7 "
                f"with momentum 0.9), got {self.outer_lr!r}.")
        if not (isinstance(self.outer_momentum, (int, float)) and
                0.0 <= self.outer_momentum < 1.0):
            raise AveragingError(
                f"--dp-outer-momentum must be in [0, 1) (0 = none), got "
                f"{self.outer_momentum!r}.")
        if self.ema_start < 0 or self.ema_anneal_iters < 0:
            raise AveragingError(
                f"--dp-ema-start and --dp-ema-anneal-iters must be >= 0, got "
                f"{self.ema_start} and {self.ema_anneal_iters}.")
        return self

    @property
    def groups(self) -> int:
        """N = ceil(1 / fraction), robust to 1 / 0.05 = 20.000000000000004."""
        return max(1, math.ceil(round(1.0 / self.fraction, 9)))

    def overlap_note(self) -> Optional[str]:
        """A start-up note when every coordinate is selected again before its previous
        average has landed (N = ceil(1/p) <= tau): the new snapshot is taken before that
        average's jump, so the drift counts the jump again (the order kept: at
        N > tau it only happens at cycle boundaries, and accounting it exactly measured
        worse there). When it happens every step the run degrades."""
        if self.delay == 0 or self.groups > self.delay:
            return None
        return (f"note: --dp-fraction {self.fraction} with --dp-delay {self.delay}: each "
                f"coordinate is averaged again every {self.groups} step(s), before its "
                f"average from {self.delay} steps earlier has landed, so every drift "
                f"correction also counts an average's jump (measured at PP 2 x DP 2, 1000 "
                f"steps: p = 1, tau = 2 ended 7.3 % above averaging every step without "
                f"delay, p = 0.5, tau = 2 3.2 % at step 600). Keep --dp-fraction below "
                f"1 / --dp-delay or shorten the delay (the README's \"averages in "
                f"flight\").")

    def momentum(self, step: int) -> float:
        """EMA momentum m at ``step``: constant, then a half cosine from start to end."""
        lo, hi = self.ema_momentum_start, self.ema_momentum_end
        if step < self.ema_start:
            return lo
        length = self.ema_anneal_iters or max(1, self.train_iters - self.ema_start)
        x = min(1.0, (step - self.ema_start) / length)
        return hi - (hi - lo) * 0.5 * (1.0 + math.cos(math.pi * x))


def stable_seed(*parts) -> int:
    """A 63-bit seed from strings/ints, identical on every machine and Python."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _index_dtype(n: int) -> torch.dtype:
    # int32 indices halve the selector's memory; torch indexes with them directly.
    return torch.int32 if n < 2 ** 31 else torch.int64


class Coordinates:
    """One tensor's selected coordinates as an index tensor (partition, bernoulli)."""

    __slots__ = ("index",)

    def __init__(self, index: torch.Tensor):
        self.index = index

    def numel(self) -> int:
        return self.index.numel()

    def gather(self, flat: torch.Tensor, out: torch.Tensor) -> None:
        if flat.dtype == out.dtype:
            torch.index_select(flat, 0, self.index, out=out)
        else:
            out.copy_(flat[self.index])

    def scatter(self, flat: torch.Tensor, values: torch.Tensor) -> None:
        flat[self.index] = values.to(flat.dtype)

    def coordinates(self) -> torch.Tensor:
        return self.index.long()


class Blocks:
    """One tensor's selected blocks: ``rows`` (sorted, on the parameters' device) of the
    tensor viewed as ``[n // length, length]``, plus the short last block when it is
    selected (``tail``). Gather and scatter copy whole contiguous blocks, one kernel
    each, and every size is known on the host (no device synchronisation)."""

    __slots__ = ("rows", "count", "length", "full", "tail", "n")

    def __init__(self, rows: torch.Tensor, count: int, length: int, n: int, tail: bool):
        self.rows, self.count, self.length, self.n, self.tail = rows, count, length, n, tail
        self.full = n // length * length

    def numel(self) -> int:
        return self.count * self.length + (self.n - self.full if self.tail else 0)

    def _matrix(self, flat: torch.Tensor) -> torch.Tensor:
        return flat[:self.full].view(-1, self.length)

    def gather(self, flat: torch.Tensor, out: torch.Tensor) -> None:
        k = self.count * self.length
        if self.count:
            target = out[:k].view(self.count, self.length)
            if flat.dtype == out.dtype:
                torch.index_select(self._matrix(flat), 0, self.rows, out=target)
            else:
                target.copy_(self._matrix(flat).index_select(0, self.rows))
        if self.tail:
            out[k:].copy_(flat[self.full:])

    def scatter(self, flat: torch.Tensor, values: torch.Tensor) -> None:
        k = self.count * self.length
        if self.count:
            self._matrix(flat).index_copy_(
                0, self.rows, values[:k].view(self.count, self.length).to(flat.dtype))
        if self.tail:
            flat[self.full:].copy_(values[k:])

    def coordinates(self) -> torch.Tensor:
        rows = self.rows.long().cpu()
        idx = (rows[:, None] * self.length + torch.arange(self.length)).view(-1)
        if self.tail:
            idx = torch.cat([idx, torch.arange(self.full, self.n)])
        return idx


class PartitionSelector:
    """Disjoint groups of coordinates per tensor, cycled; a fresh permutation every cycle."""

    def __init__(self, keys: Sequence[str], numels: Sequence[int], fraction: float, seed: int,
                 device: Optional[torch.device] = None):
        self.keys, self.numels = list(keys), list(numels)
        self.seed = seed
        self.groups = AveragingConfig(fraction=fraction).groups
        self.device = device
        self._cycle = -1
        self._perms: List[torch.Tensor] = []
        self.builds = 0            # cycles whose permutations were drawn (once each)

    def permutations(self, cycle: int) -> List[torch.Tensor]:
        if cycle != self._cycle:
            self.builds += 1
            perms = []
            for key, n in zip(self.keys, self.numels):
                gen = torch.Generator().manual_seed(stable_seed(self.seed, key, "cycle", cycle))
                perms.append(torch.randperm(n, generator=gen, dtype=_index_dtype(n))
                             .to(self.device))
            self._perms, self._cycle = perms, cycle
        return self._perms

    def select(self, step: int) -> List[Coordinates]:
        cycle, group = divmod(step, self.groups)
        out = []
        for perm, n in zip(self.permutations(cycle), self.numels):
            out.append(Coordinates(
                perm[group * n // self.groups:(group + 1) * n // self.groups]))
        return out

    def held_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._perms)


class BlockSelector:
    """The partition selector over contiguous blocks of ``block_size`` coordinates: per
    tensor and per cycle a random permutation of its blocks cut into N groups, step
    ``t`` takes group ``t mod N`` (sorted). Each coordinate is averaged exactly once per
    cycle, as with ``partition``, but every pass is a sequential copy of whole blocks
    and the permutation is ``block_size`` times smaller. A cycle's groups are drawn on
    the host and copied to the parameters' device once."""

    def __init__(self, keys: Sequence[str], numels: Sequence[int], fraction: float, seed: int,
                 device: Optional[torch.device] = None, block_size: int = 1024):
        self.keys, self.numels = list(keys), list(numels)
        self.seed, self.block_size = seed, block_size
        self.groups = AveragingConfig(fraction=fraction).groups
        self.device = device
        self._cycle = -1
        self._rows: Optional[torch.Tensor] = None      # every tensor's groups, concatenated
        self._plan: List[List[Tuple[int, int, bool]]] = []   # [tensor][group] -> (start, count, tail)
        self.builds = 0

    def _build(self, cycle: int) -> None:
        self.builds += 1
        rows, plan, offset = [], [], 0
        n_groups = self.groups
        for key, n in zip(self.keys, self.numels):
            full, tail = divmod(n, self.block_size)
            blocks = full + (1 if tail else 0)
            gen = torch.Generator().manual_seed(stable_seed(self.seed, key, "blocks", cycle))
            perm = torch.randperm(blocks, generator=gen)
            # Group g is perm[g * blocks // N : (g + 1) * blocks // N], sorted: one sort
            # of (group, block) keys orders every group at once.
            bounds = [g * blocks // n_groups for g in range(n_groups + 1)]
            sizes = [bounds[g + 1] - bounds[g] for g in range(n_groups)]
            group_of = torch.repeat_interleave(torch.arange(n_groups), torch.tensor(sizes))
            ids = (group_of * blocks + perm).sort().values - group_of * blocks
            tail_group = (int(group_of[int((perm == full).nonzero())]) if tail else -1)
            if tail:                                  # the short block is its group's last
                keep = torch.ones(blocks, dtype=torch.bool)
                keep[bounds[tail_group + 1] - 1] = False
                ids = ids[keep]
            groups = []
            for g in range(n_groups):
                count = sizes[g] - (1 if g == tail_group else 0)
                groups.append((offset, count, g == tail_group))
                offset += count
            rows.append(ids)
            plan.append(groups)
        host = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.int64)
        if self.device is not None and self.device.type == "cuda":
            # Pinned and non-blocking: the copy does not wait for the device's queue.
            self._rows = host.pin_memory().to(self.device, non_blocking=True)
        else:
            self._rows = host.to(self.device)
        self._plan, self._cycle = plan, cycle

    def select(self, step: int) -> List[Blocks]:
        cycle, group = divmod(step, self.groups)
        if cycle != self._cycle:
            self._build(cycle)
        out = []
        for n, groups in zip(self.numels, self._plan):
            start, count, tail = groups[group]
            out.append(Blocks(self._rows[start:start + count], count, self.block_size, n, tail))
        return out

    def held_bytes(self) -> int:
        return 0 if self._rows is None else self._rows.numel() * self._rows.element_size()


class BernoulliSelector:
    """Each coordinate independently with probability ``fraction`` per step."""

    def __init__(self, keys: Sequence[str], numels: Sequence[int], fraction: float, seed: int,
                 device: Optional[torch.device] = None):
        self.keys, self.numels = list(keys), list(numels)
        self.fraction, self.seed, self.device = fraction, seed, device

    def select(self, step: int) -> List[Coordinates]:
        out = []
        for key, n in zip(self.keys, self.numels):
            gen = torch.Generator().manual_seed(stable_seed(self.seed, key, "step", step))
            mask = torch.rand(n, generator=gen) < self.fraction
            out.append(Coordinates(mask.nonzero().view(-1).to(_index_dtype(n)).to(self.device)))
        return out

    def held_bytes(self) -> int:
        return 0


def make_selector(cfg: AveragingConfig, keys, numels, device=None):
    if cfg.selector == "block":
        return BlockSelector(keys, numels, cfg.fraction, cfg.seed, device, cfg.block_size)
    cls = PartitionSelector if cfg.selector == "partition" else BernoulliSelector
    return cls(keys, numels, cfg.fraction, cfg.seed, device)


def selected_coordinates(selector, step: int) -> List[torch.Tensor]:
    """Step ``step``'s coordinates per tensor as int64 index tensors (for replays and
    tests; the averager itself gathers and scatters through the selections)."""
    return [s.coordinates() for s in selector.select(step)]


@dataclass
class _Pending:
    step: int                      # the optimizer step whose weights were snapshotted
    snapshot: torch.Tensor         # W_i^(t)[S_t], concatenated over tensors
    buffer: torch.Tensor           # being all-reduced (sum over replicas); padded to R parts
    work: object                   # the async handle (None once waited / restored)
    selection: list                # S_t per tensor, carried to the apply tau steps later
    part: Optional[torch.Tensor] = None   # this rank's part of ``buffer`` (R > 1) until
                                          # the replica's ranks exchanged their parts


class SparseAverager:
    """One replica's side of the averaging, over one data-parallel group.

    ``params`` is a list of ``(key, tensor)``: ``key`` names the tensor the same
    way on every replica (and in every pipeline layout). Call :meth:`step`
    once after every optimizer step. ``comm`` is ``deepspeed.comm`` (anything
    with its ``all_reduce / get_world_size / all_gather_object`` works: the
    single-process tests pass a fake group). ``after_apply`` runs after
    parameters were overwritten (e.g. copy fp32 main params into bf16 model
    params).

    ``replica_group``: the other ranks of this rank's replica (``--dp-ranks-per-replica
    R > 1``), which hold the same parameters. Then ``group`` is the averaging group
    (one rank per replica) and the replica's R ranks split the work: each all-reduces
    one R-th of every step's selection (and of the outer step's anchor, the dense
    warm-up's model) across the replicas, and when the average is applied they
    all-gather the parts inside the replica (its fast links). A replica
    thus sends the selection once across the slow links whatever R, and its ranks
    apply identical averages, so they stay identical.
    """

    def __init__(self, params: Sequence[Tuple[str, torch.Tensor]], cfg: AveragingConfig,
                 group=None, comm=None, after_apply: Optional[Callable[[], None]] = None,
                 replica_group=None):
        if comm is None:
            import deepspeed.comm as comm
        self.cfg = cfg.validate()
        self.comm, self.group = comm, group
        self.keys = [k for k, _ in params]
        self.params = [p for _, p in params]
        if len(set(self.keys)) != len(self.keys):
            raise AveragingError("SparseAverager needs distinct parameter keys.")
        self.world = comm.get_world_size(group=group)
        self.replica_group = replica_group
        self.parts = comm.get_world_size(group=replica_group) if replica_group is not None \
            else 1
        self.part_index = comm.get_rank(group=replica_group) if self.parts > 1 else 0
        self.after_apply = after_apply
        device = self.params[0].device if self.params else None
        self.selector = make_selector(cfg, self.keys, [p.numel() for p in self.params], device)
        self.pending: deque = deque()
        # The drift EMA (ema correction only) and which coordinates it has seen: with the
        # partition selector a coordinate applied at step s was seen before iff s is past
        # the first cycle (every coordinate is applied once per cycle, in step order), so
        # only the Bernoulli selector keeps a mask.
        self.ema: Dict[int, torch.Tensor] = {}
        self.seen: Dict[int, torch.Tensor] = {}
        if cfg.correction == "ema":
            for j, p in enumerate(self.params):
                self.ema[j] = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
                if cfg.selector == "bernoulli":
                    self.seen[j] = torch.zeros(p.numel(), dtype=torch.bool, device=p.device)
        # The outer step's anchor (the consensus) and momentum, fp32; the anchor starts as
        # the replicas' mean of these weights, so every replica holds the same: one dense
        # all-reduce at the first step (:meth:`_reduce_anchor`), none when a checkpoint's
        # anchor is loaded first or a dense warm start sets it.
        self.anchor: Dict[int, torch.Tensor] = {}
        self.outer_m: Dict[int, torch.Tensor] = {}
        if cfg.outer:
            for j, p in enumerate(self.params):
                self.anchor[j] = torch.empty(p.numel(), dtype=torch.float32, device=p.device)
                if cfg.outer_momentum:
                    self.outer_m[j] = torch.zeros(p.numel(), dtype=torch.float32,
                                                  device=p.device)
        self._scratch: Dict[str, torch.Tensor] = {}   # per-step workspaces, reused
        self.steps = 0                 # optimizer steps seen (the next snapshot's t)
        self.elements_sent = 0
        self.bytes_sent = 0
        self.last_step_bytes = 0
        self.replica_bytes_sent = 0     # the parts' all-gather inside the replica
        self.reset_anchor()
        self.check_replicas_agree()

    # ------------------------------------------------------------------ set-up
    def signature(self) -> dict:
        shapes = [(k, tuple(p.shape), str(p.dtype)) for k, p in zip(self.keys, self.params)]
        digest = hashlib.sha256(repr(shapes).encode()).hexdigest()[:16]
        fields = asdict(self.cfg)
        fields.pop("train_iters")
        return {**fields, "tensors": digest}

    def check_replicas_agree(self) -> None:
        """Every replica must select the same coordinates: same seed, settings and
        tensors. One all_gather_object; every rank raises the same error."""
        mine = self.signature()
        gathered = []
        for group, size in ((self.group, self.world), (self.replica_group, self.parts)):
            if size > 1:
                out = [None] * size
                self.comm.all_gather_object(out, mine, group=group)
                gathered += out
        for other in gathered:
            if other != mine:
                diff = {k: (mine.get(k), other.get(k)) for k in set(mine) | set(other)
                        if mine.get(k) != other.get(k)}
                raise AveragingError(
                    f"data-parallel replicas disagree on the sparse-averaging settings "
                    f"{diff} (this rank, another): they would average different coordinates. "
                    f"Launch every rank with the same --dp-* flags and --dp-seed / --seed.")

    # ------------------------------------------------------------------ per step
    def _gather(self, selection: list, tensors: Optional[list] = None,
                scratch: Optional[str] = None) -> torch.Tensor:
        """The selected coordinates of ``tensors`` (default: the parameters) as one fp32
        vector, copied straight into it (one copy per tensor, no concatenation); into the
        reused workspace ``scratch`` when the result is only needed during this step."""
        tensors = self.params if tensors is None else tensors
        total = sum(s.numel() for s in selection)
        device = tensors[0].device if tensors else None
        if scratch is None:
            out = torch.empty(total, dtype=torch.float32, device=device)
        else:
            held = self._scratch.get(scratch)
            if held is None or held.numel() < total:
                held = self._scratch[scratch] = torch.empty(
                    total + total // 4, dtype=torch.float32, device=device)
            out = held[:total]
        offset = 0
        for t, s in zip(tensors, selection):
            n = s.numel()
            if n:
                s.gather(t.detach().view(-1), out[offset:offset + n])
            offset += n
        return out

    def _scatter(self, selection: list, values: torch.Tensor,
                 tensors: Optional[list] = None) -> None:
        tensors = self.params if tensors is None else tensors
        offset = 0
        with torch.no_grad():
            for t, s in zip(tensors, selection):
                n = s.numel()
                if n:
                    s.scatter(t.view(-1), values[offset:offset + n])
                offset += n

    def step(self) -> int:
        """Snapshot and launch this step's average; apply those now ``delay`` old.
        Returns the bytes this rank handed to the all-reduce in this step."""
        t = self.steps
        self.steps += 1
        if t < self.cfg.dense_iters:
            return self._dense_step()
        anchor_bytes = 0 if self.anchor_reduced else self._reduce_anchor()
        selection = self._select(t)
        snapshot = self._gather(selection)
        buffer, part = self._parts(snapshot)
        work = None
        if self.world > 1:
            work = self.comm.all_reduce(part, group=self.group, async_op=True)
        self.pending.append(_Pending(t, snapshot, buffer, work, selection,
                                     part if self.parts > 1 else None))
        self.last_step_bytes = part.numel() * part.element_size() if self.world > 1 else 0
        self.elements_sent += part.numel() if self.world > 1 else 0
        self.bytes_sent += self.last_step_bytes
        self.last_step_bytes += anchor_bytes
        while self.pending and self.pending[0].step + self.cfg.delay <= t:
            self._apply(self.pending.popleft(), t)
        return self.last_step_bytes

    def _parts(self, values: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(buffer, part)``: a copy of ``values`` to reduce, and the part of it this rank
        all-reduces across replicas: all of it for one-rank replicas; for R ranks the
        buffer is padded to R equal parts and this rank takes its own."""
        if self.parts == 1:
            buffer = values.clone()
            return buffer, buffer
        n = values.numel()
        size = -(-n // self.parts)
        buffer = torch.zeros(size * self.parts, dtype=values.dtype, device=values.device)
        buffer[:n].copy_(values)
        return buffer, buffer[self.part_index * size:(self.part_index + 1) * size]

    def _exchange_parts(self, item: _Pending) -> None:
        """Every rank of the replica gets every part of ``item``'s average."""
        if item.part is None:
            return
        self._all_gather_parts(item.buffer, item.part)
        item.buffer = item.buffer[:item.snapshot.numel()]
        item.part = None

    def _all_gather_parts(self, buffer: torch.Tensor, part: torch.Tensor) -> None:
        """``buffer`` gets every rank's ``part`` (a view of it) from the replica's ranks: an
        all-gather inside the replica; on NCCL the wait orders streams and does not block
        the host."""
        mine = part.clone()
        self.comm.all_gather_into_tensor(buffer, mine, group=self.replica_group)
        self.replica_bytes_sent += mine.numel() * mine.element_size() * (self.parts - 1)

    def _split_mean(self, whole: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(mean, part)``: the replicas' mean of ``whole`` (a flat tensor of the model),
        the replica's R ranks splitting it as they split a sparse selection: each
        all-reduces its ``part`` across the replicas, then they all-gather the parts
        inside the replica. A blocking collective (the dense warm-up, the anchor)."""
        buffer, part = self._parts(whole)
        self.comm.all_reduce(part, group=self.group)
        self._all_gather_parts(buffer, part)
        return buffer[:whole.numel()].div_(self.world), part

    def reset_anchor(self) -> None:
        """The outer step's anchor taken from the weights (at construction, and again
        when a weights-only checkpoint replaced them before the first step), to be
        all-reduced at the first sparse step."""
        if self.steps:
            raise AveragingError(f"reset_anchor after {self.steps} steps: the anchor is "
                                 f"the consensus by then; only new weights reset it.")
        for j, a in self.anchor.items():
            a.copy_(self.params[j].detach().reshape(-1))
        self.anchor_reduced = not (self.anchor and self.world > 1)

    def _reduce_anchor(self) -> int:
        """The anchor, still the weights this averager was built on, becomes the
        replicas' mean of them; returns the bytes sent, counted as this step's. Deferred
        from the constructor to the first sparse step, so that a resumed run, whose
        checkpoint holds the anchor, does not all-reduce the whole model for nothing."""
        sent = 0
        anchors = list(self.anchor.values())
        if self.parts > 1:
            mean, part = self._split_mean(torch.cat(anchors))
            write_flat(anchors, mean)
            self.elements_sent += part.numel()
            sent = part.numel() * part.element_size()
        else:
            for a in anchors:
                self.comm.all_reduce(a, group=self.group)
                a.div_(self.world)
                self.elements_sent += a.numel()
                sent += a.numel() * a.element_size()
        self.anchor_reduced = True
        self.bytes_sent += sent
        return sent

    def _select(self, step: int) -> list:
        """Step ``step``'s selection. The selector counts sparse steps, so its first
        cycle starts with the sparse averaging (after any dense warm-up) and every
        coordinate has been applied once by the end of it."""
        return self.selector.select(step - self.cfg.dense_iters)

    def _dense_step(self) -> int:
        """A warm-up step: every parameter replaced by the replicas' mean now (p = 1,
        tau = 0, avg; a blocking all-reduce per tensor, in place)."""
        sent = elements = 0
        if self.world > 1 and self.parts > 1:
            mean, part = self._split_mean(
                torch.cat([p.detach().float().reshape(-1) for p in self.params]))
            write_flat(self.params, mean)
            sent, elements = part.numel() * part.element_size(), part.numel()
        elif self.world > 1:
            with torch.no_grad():
                for p in self.params:
                    flat = p.detach().view(-1)
                    self.comm.all_reduce(flat, group=self.group)
                    flat.div_(self.world)
                    sent += flat.numel() * flat.element_size()
                    elements += flat.numel()
        if self.world > 1 and self.after_apply is not None:
            self.after_apply()
        for j, a in self.anchor.items():             # the consensus is the mean now
            a.copy_(self.params[j].detach().reshape(-1))
        self.anchor_reduced = True
        self.last_step_bytes = sent
        self.elements_sent += elements
        self.bytes_sent += sent
        return sent

    def _apply(self, item: _Pending, now: int) -> None:
        if item.work is not None:
            item.work.wait()
            item.work = None
        self._exchange_parts(item)
        # In place on the item's buffer and two reused workspaces: no per-step allocation
        # besides the new snapshot. Each operation rounds exactly as the out-of-place
        # formulas of the module docstring would.
        selection = item.selection
        new = item.buffer.div_(self.world)                     # the average A
        cfg = self.cfg
        if self.anchor:
            new = self._outer_step(selection, new)
        if cfg.correction != "avg":
            drift = self._gather(selection, scratch="drift").sub_(item.snapshot)
            correction = (drift if cfg.correction == "drift" else
                          self._update_ema(selection, drift, cfg.momentum(now), item.step))
            if cfg.lam != 1.0:
                correction.mul_(cfg.lam)
            new.add_(correction)
        self._scatter(selection, new)
        if self.after_apply is not None:
            self.after_apply()

    def _outer_step(self, selection, average: torch.Tensor) -> torch.Tensor:
        """The anchor's new value at the selection (also written to the anchor):
        ``Z - eta (G + mu M)`` with ``G = Z - A`` and ``M <- mu M + G``."""
        cfg = self.cfg
        anchors = [self.anchor[j] for j in range(len(self.params))]
        z = self._gather(selection, anchors, scratch="anchor")
        g = torch.sub(z, average, out=average)                 # G, in A's buffer
        if self.outer_m:
            moms = [self.outer_m[j] for j in range(len(self.params))]
            m = self._gather(selection, moms, scratch="outer_m").mul_(
                cfg.outer_momentum).add_(g)
            self._scatter(selection, m, moms)
            g.add_(m, alpha=cfg.outer_momentum)
        z.sub_(g, alpha=cfg.outer_lr)
        self._scatter(selection, z, anchors)
        return z

    def _update_ema(self, selection, drift: torch.Tensor, m: float, step: int) -> torch.Tensor:
        """The drift EMA at the selected coordinates, updated with ``drift``. Partition and
        block selectors: a coordinate applied past the first cycle was seen before, so the
        whole selection updates in one pass; Bernoulli keeps a seen mask."""
        if not self.seen:
            ema = [self.ema[j] for j in range(len(self.params))]
            if step >= self.cfg.dense_iters + self.cfg.groups:     # seen one cycle ago
                e = self._gather(selection, ema, scratch="ema").mul_(m).add_(
                    drift.mul_(1.0 - m))
            else:
                e = drift
            self._scatter(selection, e, ema)
            return e
        out, offset = [], 0
        for j, s in enumerate(selection):
            idx = s.index
            n = idx.numel()
            d = drift[offset:offset + n]
            offset += n
            e = torch.where(self.seen[j][idx], m * self.ema[j][idx] + (1.0 - m) * d, d)
            self.seen[j][idx] = True
            self.ema[j][idx] = e
            out.append(e)
        return torch.cat(out) if out else drift

    def wait_in_flight(self) -> None:
        """Wait for every launched all-reduce without applying it (the delay queue
        is unchanged); replicas of several ranks exchange their parts (a collective of
        the replica: every rank calls this at the same point). Call before a process
        group goes away: gloo runs async collectives on worker threads, and a peer
        leaving while one of them still runs aborts the process."""
        for item in self.pending:
            if item.work is not None:
                item.work.wait()
                item.work = None
            self._exchange_parts(item)      # the replica's ranks now hold the same state

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Everything a resumed run needs, as tensors: counters, the averages still
        waiting for their delay (snapshot and summed buffer; their coordinates are
        recomputed from the step), the drift EMA. Waits for in-flight all-reduces
        (they finished long before, normally)."""
        self.wait_in_flight()
        state = {"counters": torch.tensor([self.steps, self.elements_sent, self.bytes_sent],
                                          dtype=torch.int64)}
        for item in self.pending:
            state[f"pending.{item.step}.snapshot"] = item.snapshot
            state[f"pending.{item.step}.buffer"] = item.buffer
        for j in self.ema:
            state[f"ema.{self.keys[j]}"] = self.ema[j]
            state[f"seen.{self.keys[j]}"] = self._seen_mask(j).to(torch.uint8)
        state.update(self._outer_state())
        return state

    def _seen_mask(self, j: int) -> torch.Tensor:
        """Coordinates of tensor ``j`` the EMA has seen (stored by the Bernoulli selector;
        the partition selector's follows from the steps applied). Checkpoints keep the
        mask for both, so their format does not depend on the selector."""
        if j in self.seen:
            return self.seen[j]
        applied = self.steps - len(self.pending)        # steps 0 .. applied-1 were applied
        p = self.params[j]
        mask = torch.zeros(p.numel(), dtype=torch.bool, device=p.device)
        first = self.cfg.dense_iters                     # the first sparse step
        if applied >= first + self.cfg.groups:
            mask.fill_(True)
        else:
            for s in range(first, applied):
                mask[self._select(s)[j].coordinates().to(mask.device)] = True
        return mask

    def state_template(self, steps: int) -> dict:
        """Empty tensors shaped like :meth:`state_dict` after ``steps`` steps (what a
        checkpoint loader needs before reading)."""
        device = self.params[0].device if self.params else None
        state = {"counters": torch.zeros(3, dtype=torch.int64)}
        for s in range(max(self.cfg.dense_iters, steps - self.cfg.delay), steps):
            n = sum(sel.numel() for sel in self._select(s))
            state[f"pending.{s}.snapshot"] = torch.empty(n, device=device)
            state[f"pending.{s}.buffer"] = torch.empty(n, device=device)
        for j in self.ema:
            state[f"ema.{self.keys[j]}"] = torch.empty_like(self.ema[j])
            state[f"seen.{self.keys[j]}"] = torch.empty(self.ema[j].numel(), dtype=torch.uint8,
                                                         device=device)
        state.update({k: torch.empty_like(t) for k, t in self._outer_state().items()})
        return state

    def load_state_dict(self, state: dict) -> None:
        self.steps, self.elements_sent, self.bytes_sent = (int(x) for x in state["counters"])
        pending = sorted(int(k.split(".")[1]) for k in state
                         if k.startswith("pending.") and k.endswith(".snapshot"))
        self.pending = deque(_Pending(s, state[f"pending.{s}.snapshot"],
                                      state[f"pending.{s}.buffer"], None,
                                      self._select(s)) for s in pending)
        for j in self.ema:
            self.ema[j].copy_(state[f"ema.{self.keys[j]}"])
            if j in self.seen:
                self.seen[j].copy_(state[f"seen.{self.keys[j]}"].bool())
        for key, t in self._outer_state().items():
            if key not in state:
                raise AveragingError(
                    f"the checkpoint has no outer-step state ({key}): it was saved "
                    f"without --dp-outer-lr / --dp-outer-momentum. Resume with "
                    f"--dp-outer-lr 1 --dp-outer-momentum 0, or start a new run.")
            t.copy_(state[key])
        if self.anchor:
            self.anchor_reduced = True          # the checkpoint's anchor is the consensus

    def _outer_state(self) -> Dict[str, torch.Tensor]:
        """The outer step's anchor and momentum by checkpoint key (empty without it)."""
        return {f"{name}.{self.keys[j]}": t
                for name, held in (("anchor", self.anchor), ("outer_m", self.outer_m))
                for j, t in held.items()}

    def state_bytes_per_parameter(self) -> float:
        """Bytes the averager keeps per parameter besides the pending averages: the drift
        EMA, the seen mask (Bernoulli) and the selector's current cycle."""
        numel = sum(p.numel() for p in self.params) or 1
        held = sum(t.numel() * t.element_size() for t in self.ema.values())
        held += sum(t.numel() * t.element_size() for t in self.seen.values())
        held += sum(t.numel() * t.element_size() for t in self._outer_state().values())
        return (held + self.selector.held_bytes()) / numel

    def pending_bytes_per_parameter(self) -> float:
        numel = sum(p.numel() for p in self.params) or 1
        return sum(i.snapshot.numel() * i.snapshot.element_size()
                   + i.buffer.numel() * i.buffer.element_size()
                   for i in self.pending) / numel

    def stats(self) -> dict:
        return {"steps": self.steps, "elements_sent": self.elements_sent,
                "bytes_sent": self.bytes_sent,
                "bytes_per_step": self.bytes_sent / self.steps if self.steps else 0.0,
                "replica_bytes_sent": self.replica_bytes_sent,
                "replicas": self.world, "ranks_per_replica": self.parts,
                **{f"cfg_{k}": v for k, v in asdict(self.cfg).items()}}


def expected_elements_per_step(numels: Sequence[int], fraction: float, step: int) -> int:
    """What the partition selector sends at ``step``: sum of its group sizes."""
    groups = AveragingConfig(fraction=fraction).groups
    g = step % groups
    return sum((g + 1) * n // groups - g * n // groups for n in numels)
