"""The stacked trainer: K >= 1 runs differing only in lr and seed, trained as ONE model.

Every run trains through it (``normbench run`` is a stack of one; see normbench.engine.lifecycle for
the lifecycle around it). Small networks spend most of their time in per-op overhead; K
members stacked into one network do the same number of ops per step as one run. The stacking
is by hand (:mod:`normbench.engine.layers`): batched matmuls, grouped convs, norms over K*C
channels; :mod:`normbench.engine.recurrent` for model=rnn.

API::

    key = stack_key(cfg)                     # equal keys: stackable together (all but lr, seed)
    budget = memory_budget(device) - seeds * estimate_data_bytes(shape, n_train)
    for chunk in chunk_members(cfgs, max_members=16, max_bytes=budget,
                               member_bytes=estimate_member_bytes(cfgs[0], shape, outputs)):
        trainer = StackedTrainer(chunk)      # builds each member as a single run would
        for epoch in ...:
            stats = trainer.train_epoch()    # list[EpochStats | None], one per member
            for k in trainer.active_members():
                if diverged(stats[k]): trainer.deactivate(k)
            val = trainer.evaluate("val")    # list[(loss, acc) | None]
            trainer.scheduler_step(val_losses)   # optimizer.scheduler=plateau only
        state = trainer.state()              # to go on later: trainer.load_state(state)
        trainer.member_state_dict(k)         # the single model's keys and shapes
        trainer.member_module(k)             # a plain Net or RecurrentNet: member k's weights

Each member: its model is ``build_model`` + ``init_paired(model, seed)`` +
``torch.manual_seed(seed)`` exactly as ``experiment.prepare``; its own data
(``load_dataset(cfg.dataset, seed)``, loaded once per distinct seed); its own data order (a
``torch.Generator`` seeded with its seed, one randperm per epoch, as ``train.shuffled_batches``,
last incomplete batch dropped); its own lr and optimizer state (:mod:`normbench.engine.optim`:
SGD and Adam re-implemented with a (K,) lr, exact torch semantics, the no-weight-decay-on-norm
rule of ``train.make_optimizer``); its own dropout masks (a generator per member replaying the
single run's global stream). Batch statistics are per member: no op reduces across members.

A deactivated member (diverged) is taken out of the stack: its parameters, buffers and
optimizer state are saved as they are and the remaining members go on, computing nothing for
it. Its ``member_state_dict`` is the snapshot.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn

from normbench import norms, results
from normbench.datasets import DataSplits, load_dataset
from normbench.engine.layers import (
    StackedBatchNorm,
    StackedBatchRenorm,
    StackedGhostBatchNorm,
    StackedNet,
    StackedReferenceBatchNorm,
    unsupported_module,
)
from normbench.engine.optim import StackedAdam, StackedPlateau, StackedSGD
from normbench.engine.recurrent import StackedRecurrentNet, unsupported_recurrent
from normbench.engine.train import EpochStats, pick_device
from normbench.models import build_model, init_paired
from normbench.models.recurrent import RecurrentNet

Tensors = tuple[Tensor, Tensor]
T = TypeVar("T")

_BATCH_NORM_STACKS = (
    StackedBatchNorm,
    StackedReferenceBatchNorm,
    StackedBatchRenorm,
    StackedGhostBatchNorm,
)
EVAL_BATCH = 1024  # examples per member in each evaluation step


def stack_unsupported(model: nn.Module) -> str | None:
    """Why the stacked layers cannot mirror ``model`` (one line), or None when they can."""
    if isinstance(model, RecurrentNet):
        return unsupported_recurrent(model)
    return unsupported_module(model)


def stack_model(models: Sequence[nn.Module], generators: list[torch.Generator]) -> nn.Module:
    """The stacked network of ``models`` (one architecture): (K, B, *input) -> (K, B, out)."""
    if isinstance(models[0], RecurrentNet):
        return StackedRecurrentNet(models, generators)
    return StackedNet(models, generators)


def stack_key(cfg: DictConfig) -> str:
    """A string equal for configs that may share a stack: the same run but for lr and seed."""
    return results.setup_key(cfg)


def estimate_member_bytes(cfg: DictConfig, input_shape: Sequence[int], num_outputs: int) -> int:
    """A generous estimate of one member's memory in a stack, in bytes, its data aside.

    Parameters x (param, grad, optimizer state(s), update temporaries), plus the larger of
    every module's output for one training batch x 3 (kept for backward, its gradient, a
    temporary) and, for one evaluation batch of ``EVAL_BATCH``, its inputs and twice the
    largest module output (without gradients, outputs are freed as the next is computed).
    """
    model = build_model(cfg.model, cfg.norm, input_shape, num_outputs)
    params = sum(p.numel() for p in model.parameters())
    buffers = sum(b.numel() for b in model.buffers())
    activations = largest = 0

    def count(module, inputs, output):
        nonlocal activations, largest
        size = sum(o.numel() for o in (output if isinstance(output, tuple) else (output,)))
        if isinstance(module, nn.RNNCellBase):  # its gates, called once per time step
            size += len(inputs[0]) * module.weight_ih.shape[0]
        activations += size
        largest = max(largest, size)

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(count) for m in leaves]
    batch = max(cfg.batch_size, 2)
    with torch.no_grad():
        model.train()
        model(torch.zeros(batch, *input_shape))
    for handle in handles:
        handle.remove()
    states = 2 if cfg.optimizer.name == "adam" else 1
    evaluation = EVAL_BATCH * (math.prod(input_shape) + 1 + 2 * largest // batch)
    return 4 * (params * (3 + states) + buffers + max(3 * activations, evaluation))


def estimate_data_bytes(input_shape: Sequence[int], n_examples: int) -> int:
    """The bytes of ``n_examples`` float32 inputs and their targets: one seed's training data
    on the stack's device (members of one seed share it)."""
    return 4 * n_examples * (math.prod(input_shape) + 1)


def memory_budget(device: torch.device) -> int | None:
    """Bytes a stack may use: half of what ``device`` has free now (None: unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] // 2
    try:  # the host's memory (MPS shares it)
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 2
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES") // 2
    except (ValueError, OSError):
        return None


def chunk_members(
    members: Sequence[T],
    max_members: int | None = None,
    max_bytes: int | None = None,
    member_bytes: int = 0,
) -> list[list[T]]:
    """Split ``members`` into as few chunks as the caps allow, of near-equal sizes, in order.

    No chunk holds more than ``max_members``, nor more than ``max_bytes // member_bytes``
    members (at least one: a member too big for the budget runs alone).
    """
    cap = len(members) or 1
    if max_members is not None:
        cap = min(cap, max(max_members, 1))
    if max_bytes is not None and member_bytes > 0:
        cap = min(cap, max(max_bytes // member_bytes, 1))
    n_chunks = math.ceil(len(members) / cap) if members else 0
    chunks, start = [], 0
    for i in range(n_chunks):
        size = len(members) // n_chunks + (i < len(members) % n_chunks)
        chunks.append(list(members[start : start + size]))
        start += size
    return chunks


class StackedTrainer:
    """K members (configs equal but for lr and seed) trained as one stacked model.

    ``datasets`` optionally maps a seed to its already loaded :class:`DataSplits`; others are
    loaded with ``load_dataset(cfg.dataset, seed)``. Raises NotImplementedError for a module
    the stacked layers do not mirror (planning rejects such a config first: checks.py).
    """

    def __init__(
        self,
        cfgs: Sequence[DictConfig],
        datasets: Mapping[int, DataSplits] | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        if not cfgs:
            raise ValueError("a stack needs at least one member")
        keys = {stack_key(c) for c in cfgs}
        if len(keys) > 1:
            raise ValueError("stacked members must share every setting but lr and seed")
        cfg = self.cfg = cfgs[0]
        self.cfgs = list(cfgs)
        self.K = len(cfgs)
        self.device = pick_device(cfg.device) if device is None else torch.device(device)
        self.batch_size = cfg.batch_size
        seeds = [int(c.seed) for c in cfgs]
        self.data: dict[int, DataSplits] = {}
        for seed in dict.fromkeys(seeds):
            self.data[seed] = (datasets or {}).get(seed) or load_dataset(cfg.dataset, seed)
        first = self.data[seeds[0]]
        self.task, self.input_shape, self.num_outputs = (
            first.task,
            first.input_shape,
            first.num_outputs,
        )
        n_train = {len(d.train[0]) for d in self.data.values()}
        if len(n_train) > 1:
            raise ValueError(f"members' training splits differ in size: {sorted(n_train)}")
        self.n_train = n_train.pop()
        if cfg.batch_size > self.n_train:  # the engine checks the data as loaded first
            raise ValueError(f"batch_size {cfg.batch_size} exceeds {self.n_train} examples")
        # The training data of the distinct seeds, stacked: (S, N, ...) and which is whose.
        order = list(self.data)
        self.train_x = torch.stack([self.data[s].train[0] for s in order]).to(self.device)
        self.train_y = torch.stack([self.data[s].train[1] for s in order]).to(self.device)
        self.data_index = torch.tensor([order.index(s) for s in seeds], device=self.device)

        by_seed: dict[int, nn.Module] = {}
        for seed in dict.fromkeys(seeds):  # exactly as experiment.prepare, once per seed
            model = build_model(cfg.model, cfg.norm, first.input_shape, first.num_outputs)
            init_paired(model, seed)
            torch.manual_seed(seed)
            by_seed[seed] = model
        models = [by_seed[seed] for seed in seeds]  # read only: their weights are stacked
        self.template = models[0]
        self.dropout_generators = [
            torch.Generator(self.device).manual_seed(int(c.seed)) for c in cfgs
        ]
        self.order_generators = [torch.Generator().manual_seed(int(c.seed)) for c in cfgs]
        self.net = stack_model(models, self.dropout_generators).to(self.device)
        self.freeze = bool(cfg.norm.get("freeze", False))
        if self.freeze:
            for module in self._frozen_norms():
                for p in module.parameters():
                    p.requires_grad_(False)
        self.params = [p for p in self.net.parameters() if p.requires_grad]
        self.optimizer = self._make_optimizer(models[0])
        opt = cfg.optimizer
        self.scheduler = (
            StackedPlateau(self.optimizer, opt.plateau_patience, opt.plateau_factor)
            if opt.get("scheduler") == "plateau"
            else None
        )
        self.loss_fn = _cross_entropy if self.task == "classification" else _mse
        self.active = list(range(self.K))  # members in the stack, in stack order
        self.snapshots: dict[int, dict[str, Tensor]] = {}

    # -- building -------------------------------------------------------------------------

    def _frozen_norms(self) -> list[nn.Module]:
        return [m for m in self.net.modules() if isinstance(m, _BATCH_NORM_STACKS)]

    def _make_optimizer(self, template: nn.Module):
        """As train.make_optimizer: norm parameters get no weight decay (by default)."""
        opt = self.cfg.optimizer
        weight_decay = float(opt.get("weight_decay", 0.0))
        skip = norms.norm_parameters(template)
        single = dict(template.named_parameters())
        decays = []
        for name, p in self.net.named_parameters():
            if not p.requires_grad:
                continue
            exempt = not opt.get("norm_weight_decay", False) and id(single[name]) in skip
            decays.append(0.0 if exempt else weight_decay)
        lr = torch.tensor([float(c.lr) for c in self.cfgs], device=self.device)
        if opt.name == "adam":
            return StackedAdam(self.params, decays, lr)
        return StackedSGD(self.params, decays, lr, momentum=float(opt.get("momentum", 0.0)))

    # -- members --------------------------------------------------------------------------

    def active_members(self) -> list[int]:
        return list(self.active)

    def lr(self, k: int) -> float:
        """Member k's current learning rate (what a single run logs as ``lr_now``)."""
        if k in self.active:
            return float(self.optimizer.lr[self.active.index(k)])
        return float(self.snapshots[k]["__lr__"])

    def deactivate(self, k: int) -> None:
        """Stop member ``k``: snapshot its state and take it out of the stack."""
        if k not in self.active:
            return
        pos = self.active.index(k)
        snapshot = self.member_state_dict(k)
        snapshot["__lr__"] = self.optimizer.lr[pos].detach().clone()
        self.snapshots[k] = snapshot
        keep = [i for i in range(len(self.active)) if i != pos]
        self.active.pop(pos)
        if not self.active:
            return
        index = torch.tensor(keep, device=self.device)
        with torch.no_grad():
            for module in self.net.modules():
                for p in module.parameters(recurse=False):
                    p.data = p.data[index].contiguous()
                    p.grad = None
                for name, b in module.named_buffers(recurse=False):
                    setattr(module, name, b[index].contiguous())
                if hasattr(module, "K"):
                    module.K = len(self.active)
        self.optimizer.keep(index)
        if self.scheduler is not None:
            self.scheduler.keep(keep)
        self.data_index = self.data_index[index]
        for generators in (self.dropout_generators, self.order_generators):
            generators[:] = [generators[i] for i in keep]

    def member_state_dict(self, k: int) -> dict[str, Tensor]:
        """Member k's state_dict: the single model's keys, shapes and dtypes."""
        if k in self.snapshots:
            return {key: v for key, v in self.snapshots[k].items() if key != "__lr__"}
        pos = self.active.index(k)
        return {key: v[pos].detach().clone() for key, v in self.net.state_dict().items()}

    def member_module(self, k: int) -> nn.Module:
        """A freshly built single model holding member k's parameters and buffers."""
        c = self.cfgs[k]
        model = build_model(c.model, c.norm, self.input_shape, self.num_outputs)
        model.load_state_dict(self.member_state_dict(k))
        return model.to(self.device)

    # -- checkpoints ----------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """Everything training goes on from (tensors and plain data, for checkpoint.py)."""
        scheduler = None
        if self.scheduler is not None:
            scheduler = [
                {"state": s.state_dict(), "lr": s.optimizer.param_groups[0]["lr"]}
                for s in self.scheduler.schedulers
            ]
        return {
            "active": list(self.active),
            "net": self.net.state_dict(),
            "lr": self.optimizer.lr,
            "optimizer": self.optimizer.state,
            "steps": getattr(self.optimizer, "steps", 0),
            "scheduler": scheduler,
            "order": [g.get_state() for g in self.order_generators],
            "dropout": [g.get_state() for g in self.dropout_generators],
            "snapshots": self.snapshots,
        }

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Go on from :meth:`state` saved by a trainer built with the same members."""
        for k in range(self.K):
            if k not in state["active"]:
                self.deactivate(k)  # shapes the stack as it was; the values are loaded below
        self.net.load_state_dict(state["net"])
        self.optimizer.lr = state["lr"].to(self.device)
        self.optimizer.state = [
            {key: value.to(self.device) for key, value in s.items()} for s in state["optimizer"]
        ]
        if hasattr(self.optimizer, "steps"):
            self.optimizer.steps = state["steps"]
        if self.scheduler is not None:
            for scheduler, saved in zip(self.scheduler.schedulers, state["scheduler"], strict=True):
                scheduler.load_state_dict(saved["state"])
                scheduler.optimizer.param_groups[0]["lr"] = saved["lr"]
        for generators, saved in (
            (self.order_generators, state["order"]),
            (self.dropout_generators, state["dropout"]),
        ):
            for generator, value in zip(generators, saved, strict=True):
                generator.set_state(value)
        self.snapshots = dict(state["snapshots"])

    # -- training -------------------------------------------------------------------------

    def train_epoch(
        self,
        on_step: Callable[[int, list[float]], None] | None = None,
        on_batch: Callable[[], None] | None = None,
    ) -> list[EpochStats | None]:
        """One epoch for every active member; None for inactive ones.

        ``on_step(step, losses)``, if given, gets each step's loss per member (nan for
        inactive ones); it forces a sync per step. ``on_batch()`` is called after each step
        without a sync (a progress bar).
        """
        if not self.active:
            return [None] * self.K
        net, batch = self.net, self.batch_size
        net.train()
        if self.freeze:
            for module in self._frozen_norms():
                module.eval()
        k = len(self.active)
        perms = torch.stack(
            [torch.randperm(self.n_train, generator=g) for g in self.order_generators]
        ).to(self.device)
        classify = self.task == "classification"
        loss_sum = torch.zeros(k, device=self.device)
        first_loss = torch.full((k,), math.nan, device=self.device)
        correct = torch.zeros(k, device=self.device, dtype=torch.int64)
        grad_sum = torch.zeros(k, device=self.device)
        steps = 0
        rows = self.data_index.unsqueeze(1)
        for start in range(0, self.n_train - batch + 1, batch):
            index = perms[:, start : start + batch]
            xb, yb = self.train_x[rows, index], self.train_y[rows, index]
            self.optimizer.zero_grad()
            out = net(xb)
            losses = self.loss_fn(out, yb)
            losses.sum().backward()
            grad_sum += _member_grad_norms(self.params, k)
            self.optimizer.step()
            losses = losses.detach()
            if steps == 0:
                first_loss = losses
            steps += 1
            loss_sum.add_(losses, alpha=batch)
            if classify:
                correct += (out.detach().argmax(-1) == yb).sum(1)
            if on_step is not None:
                on_step(steps, self._spread(losses.tolist()))
            if on_batch is not None:
                on_batch()
        seen = max(steps * batch, 1)
        losses = (loss_sum / seen).tolist()
        firsts = first_loss.tolist()
        accs = (correct / seen).tolist() if classify else [math.nan] * k
        grads = (grad_sum / max(steps, 1)).tolist()
        stats = [
            EpochStats(loss=loss, first_loss=first, acc=acc, grad_norm=grad, steps=steps)
            for loss, first, acc, grad in zip(losses, firsts, accs, grads, strict=True)
        ]
        return self._spread(stats, None)

    def _spread(self, values: list[Any], missing: Any = math.nan) -> list[Any]:
        """Per-active-member values -> one per member (``missing`` for inactive ones)."""
        out = [missing] * self.K
        for pos, k in enumerate(self.active):
            out[k] = values[pos]
        return out

    @torch.no_grad()
    def evaluate(
        self,
        split: str = "val",
        data: Sequence[Tensors] | None = None,
        batch_size: int = EVAL_BATCH,
        train_modules: Sequence[nn.Module] = (),
    ) -> list[tuple[float, float] | None]:
        """Mean loss and accuracy per member in eval mode, as ``train.evaluate``.

        ``data``: one (x, y) per member (all of one length); by default each member's own
        ``split`` ("val" or "test") of its seed's data. None for inactive members.
        ``train_modules``: modules of the net to run in training mode (diagnostics' batch
        statistics); the caller restores their state.
        """
        if not self.active:
            return [None] * self.K
        if data is None:
            splits = [getattr(self.data[int(c.seed)], split) for c in self.cfgs]
        else:
            splits = list(data)
        splits = [splits[k] for k in self.active]
        if len({len(s[0]) for s in splits}) > 1:
            raise ValueError("stacked evaluation needs every member's data of one length")
        self.net.eval()
        for module in train_modules:
            module.train()
        k, n = len(splits), len(splits[0][0])
        classify = splits[0][1].dtype == torch.int64
        loss_sum = torch.zeros(k, device=self.device)
        correct = torch.zeros(k, device=self.device, dtype=torch.int64)
        for start in range(0, n, batch_size):  # stacked a batch at a time: bounded memory
            end = start + batch_size
            xb = torch.stack([x[start:end] for x, _ in splits]).to(self.device)
            yb = torch.stack([y[start:end] for _, y in splits]).to(self.device)
            out = self.net(xb)
            loss_sum.add_(self.loss_fn(out, yb) * yb.shape[1])
            if classify:
                correct += (out.argmax(-1) == yb).sum(1)
        losses = (loss_sum / n).tolist()
        accs = (correct / n).tolist() if classify else [math.nan] * k
        return self._spread(list(zip(losses, accs, strict=True)), None)

    def scheduler_step(self, val_losses: Sequence[float]) -> None:
        """ReduceLROnPlateau per member (optimizer.scheduler=plateau); one loss per member."""
        if self.scheduler is not None:
            self.scheduler.step([val_losses[k] for k in self.active])


def _cross_entropy(out: Tensor, y: Tensor) -> Tensor:
    """(K, B, classes), (K, B) -> (K,) mean losses."""
    k, b = y.shape
    return (
        F.cross_entropy(out.reshape(k * b, -1), y.reshape(k * b), reduction="none")
        .view(k, b)
        .mean(1)
    )


def _mse(out: Tensor, y: Tensor) -> Tensor:
    return (out - y).pow(2).flatten(1).mean(1)


def _member_grad_norms(params: Sequence[Tensor], k: int) -> Tensor:
    """Each member's global gradient norm (train_one_epoch's), as a (K,) tensor."""
    norms_ = [
        torch.linalg.vector_norm(p.grad.reshape(k, -1), dim=1) for p in params if p.grad is not None
    ]
    if not norms_:
        return torch.zeros(k, device=params[0].device if params else None)
    return torch.linalg.vector_norm(torch.stack(norms_), dim=0)
