"""Per-layer diagnostics recorded during training, for ``diagnostics.csv`` (issue 5).

Tidy rows ``run_id, epoch, step, layer, quantity, value``; ``layer`` is ``block<i>`` for the
model's i-th hidden block, or ``model`` for whole-model quantities. Every ``every`` training
steps, counting from step 0 (the untrained network):

- ``input_mean``, ``input_std``: of each block's ``norm`` input, i.e. its layer's output
  (recorded for every block, with or without a norm, so runs with no norm compare);
- ``preact_p15``, ``preact_p50``, ``preact_p85``: percentiles of the last block's
  pre-activation (the input of its ``act``), Ioffe & Szegedy's Figure 1;
- ``grad_norm``: the norm of each block's layer-weight gradient (document 004).

Once per epoch, for models with batch-norm-like layers that keep running statistics:
``eval_gap``, the validation metric (accuracy, or loss for regression) with running statistics
minus with batch statistics.

``step`` counts the optimizer steps applied before the measured forward pass. Forward
pre-hooks exist only from the end of the step before a recording step to the end of that
step, and do nothing outside training mode: the other steps pay nothing.

:class:`Recorder` records every member of a :class:`~normbench.engine.trainer.StackedTrainer`
(K >= 1: ``normbench run`` is a stack of one), each member exactly as its run alone would be
recorded: its own slice of every activation and gradient, its percentiles from the same
subsample of its values in the single model's element order, its eval gap from the stacked
evaluation. :func:`eval_gap` is the same measurement on one plain model.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache, partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from normbench import norms, results
from normbench.models import build_model

if TYPE_CHECKING:
    from normbench.engine.trainer import StackedTrainer

Tensors = tuple[Tensor, Tensor]

# Percentiles of a larger pre-activation come from a fixed random subsample of this many values.
QUANTILE_SAMPLE = 16_384


# -- the formulas, per member of a stacked layout ------------------------------------------
# Activations come in the stacked engine's layouts (normbench.engine.layers): feature maps
# (B, K*C, H, W), member k owning channels k*C:(k+1)*C, and features (K, F, B).


def input_stats(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Each member's mean and (unbiased) std over all its values: two (K,) tensors."""
    values = x.reshape(x.shape[0], k, -1) if x.dim() == 4 else x.reshape(1, k, -1)
    return values.mean((0, 2)), values.std((0, 2))


def percentiles(x: Tensor, k: int) -> Tensor:
    """(len(PERCENTILES), K): each member's percentiles of its values, from the subsample of
    ``_sample_index`` (the same positions of the single model's flattened activation) when it
    holds more than QUANTILE_SAMPLE values."""
    numel = x.numel() // k
    index = _sample_index(numel, x.device) if numel > QUANTILE_SAMPLE else None
    values = member_values(x, k, index)
    levels = torch.tensor(list(results.PERCENTILES.values()), dtype=x.dtype, device=x.device)
    return torch.quantile(values, levels, dim=1)


def member_values(x: Tensor, k: int, index: Tensor | None = None) -> Tensor:
    """(K, n): each member's activation flattened in its single model's element order,
    (B, C, H, W) for maps and (B, F) for features; only the positions ``index`` if given."""
    if x.dim() == 4:  # (B, K*C, H, W) -> (B, K, C*H*W): member k's flat i is [i // CHW, k, i % CHW]
        values = x.reshape(x.shape[0], k, -1)
        if index is None:
            return values.transpose(0, 1).reshape(k, -1)
        size = values.shape[2]
        return values[index // size, :, index % size].T
    features = x.shape[1]  # (K, F, B): member k's flat i is [k, i % F, i // F]
    if index is None:
        return x.transpose(1, 2).reshape(k, -1)
    return x[:, index % features, index // features]


def grad_norms(grad: Tensor, k: int) -> Tensor:
    """(K,): the norm of each member's slice of a (K, *single_shape) gradient."""
    return torch.linalg.vector_norm(grad.reshape(k, -1), dim=1)


@lru_cache(maxsize=8)
def _sample_index(numel: int, device: torch.device) -> Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(numel, (QUANTILE_SAMPLE,), generator=generator).to(device)


# -- recording -----------------------------------------------------------------------------


class Recorder:
    """Records the diagnostics of every member of ``trainer`` (K >= 1), one run id each.

    Member k's rows are exactly those its run alone records. Use::

        recorder = Recorder(trainer, run_ids, every)
        for epoch in ...:
            stats = trainer.train_epoch(on_step=recorder.on_step)
            ...deactivate the members that diverged...
            recorder.end_epoch()             # the active members' eval_gap
        recorder.close()
        recorder.write(k, path)              # member k's diagnostics.csv

    A deactivated member records nothing more. :meth:`state` / :meth:`restore` go with the
    trainer's ``state`` / ``load_state`` in a checkpoint. Hooks sit on ``trainer.net.blocks``
    (StackedBlock: ``layer``, ``norm``, ``act``, as models.Block); a net without blocks (a
    linear model, a recurrent net) records eval_gap only.
    """

    def __init__(self, trainer: StackedTrainer, run_ids: Sequence[str], every: int) -> None:
        if len(run_ids) != trainer.K:
            raise ValueError(f"{len(run_ids)} run ids for a stack of {trainer.K} members")
        self.trainer, self.run_ids, self.every = trainer, list(run_ids), every
        cfg = trainer.cfg  # the members' single model: which of its layers keep statistics
        single = build_model(cfg.model, cfg.norm, trainer.input_shape, trainer.num_outputs)
        self._gap_layers = _running_stat_names(single)
        self.rows: list[list[dict[str, Any]]] = [[] for _ in self.run_ids]  # one list per member
        self.step = 0  # optimizer steps taken so far
        self.epoch = 1
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._pending: list[tuple[str, str, Tensor]] = []  # (layer, quantity, (K,) values)
        self._arm()

    def on_step(self, steps: int, losses: Sequence[float]) -> None:
        """``trainer.train_epoch``'s ``on_step``, after each optimizer step (gradients still
        there): finish a recording step, arm the hooks before the next."""
        if self._handles:
            k = len(self.trainer.active)
            for index, block in enumerate(self._blocks()):
                grad = block.layer.weight.grad
                if grad is not None:
                    self._pending.append((f"block{index}", "grad_norm", grad_norms(grad, k)))
            self._flush()
            self._disarm()
        self.step += 1
        if self.step % self.every == 0:
            self._arm()

    def end_epoch(self, split: str = "val") -> None:
        """Record each active member's ``eval_gap`` on its ``split`` (if the model has
        running statistics); call it after deactivating the epoch's diverged members."""
        for k, gap in enumerate(stacked_eval_gap(self.trainer, split, self._gap_layers)):
            if gap is not None:
                self.rows[k].append(self._row(k, "model", "eval_gap", gap))
        self.epoch += 1

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps, so a resumed stack records as if never interrupted."""
        return {"rows": self.rows, "step": self.step, "epoch": self.epoch}

    def restore(self, state: dict[str, Any]) -> None:
        self.rows = [list(rows) for rows in state["rows"]]
        self.step, self.epoch = state["step"], state["epoch"]
        self._disarm()
        if self.step % self.every == 0:
            self._arm()

    def close(self) -> None:
        """Remove any hooks still registered."""
        self._disarm()

    def write(self, k: int, path: Path) -> None:
        """Write member ``k``'s rows to ``path`` (only the header when it has none)."""
        if self.rows[k]:
            results.atomic_write_csv(path, self.rows[k], results.DIAGNOSTIC_COLUMNS)
        else:  # a linear model records nothing; the header still says what the file is
            results.atomic_write_text(path, ",".join(results.DIAGNOSTIC_COLUMNS) + "\n")

    def _blocks(self) -> Sequence[nn.Module]:
        return getattr(self.trainer.net, "blocks", ())  # a recurrent net has none

    def _arm(self) -> None:
        blocks = self._blocks()
        for index, block in enumerate(blocks):
            hook = partial(self._input_stats, block, f"block{index}")
            self._handles.append(block.norm.register_forward_pre_hook(hook))
        if blocks:  # a linear model (model.hidden=[]) has no hidden pre-activation
            hook = partial(self._percentiles, blocks[-1], f"block{len(blocks) - 1}")
            self._handles.append(blocks[-1].act.register_forward_pre_hook(hook))

    def _disarm(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # Hooks check the block's mode, not the hooked module's: a frozen batch norm is in eval
    # mode during training, and eval_gap runs batch norms in train mode inside an eval model.
    def _input_stats(self, block: nn.Module, layer: str, _module: nn.Module, args) -> None:
        if block.training:
            mean, std = input_stats(args[0].detach(), len(self.trainer.active))
            self._pending += [(layer, "input_mean", mean), (layer, "input_std", std)]

    def _percentiles(self, block: nn.Module, layer: str, _module: nn.Module, args) -> None:
        if block.training:
            q = percentiles(args[0].detach(), len(self.trainer.active))
            self._pending += [(layer, name, q[i]) for i, name in enumerate(results.PERCENTILES)]

    def _flush(self) -> None:
        """Turn the step's tensors into rows, one per active member each, with one sync."""
        if not self._pending:
            return
        values = torch.stack([value for _, _, value in self._pending]).tolist()
        for pos, member in enumerate(self.trainer.active):
            for (layer, quantity, _), row in zip(self._pending, values, strict=True):
                self.rows[member].append(self._row(member, layer, quantity, row[pos]))
        self._pending.clear()

    def _row(self, member: int, layer: str, quantity: str, value: float) -> dict[str, Any]:
        return dict(
            run_id=self.run_ids[member],
            epoch=self.epoch,
            step=self.step,
            layer=layer,
            quantity=quantity,
            value=value,
        )


# -- eval gap ------------------------------------------------------------------------------


def _running_stat_names(model: nn.Module) -> list[str]:
    """The names of ``model``'s batch-norm-like layers that keep running statistics."""
    return [
        name
        for name, m in model.named_modules()
        if norms.is_batch_norm(m) and m.running_mean is not None
    ]


def _gap_batches(n: int, batch_size: int) -> tuple[int, int]:
    """(examples used, batch size) of an eval-gap measurement on ``n`` examples: batches of
    the training ``batch_size`` (the whole set if smaller), a last incomplete one left out."""
    size = min(batch_size, n)
    return (n // size * size if size else 0), size


@contextmanager
def _restoring(model: nn.Module, layers: Sequence[nn.Module]) -> Iterator[None]:
    """Restore ``layers``' buffers (running statistics, step counters) and every module's
    mode of ``model`` on leaving."""
    modes = [(module, module.training) for module in model.modules()]
    saved = [[buffer.clone() for buffer in layer.buffers()] for layer in layers]
    try:
        yield
    finally:
        with torch.no_grad():
            for layer, buffers in zip(layers, saved, strict=True):
                for buffer, copy in zip(layer.buffers(), buffers, strict=True):
                    buffer.copy_(copy)
        for module, mode in modes:
            module.training = mode


@torch.no_grad()
def eval_gap(model: nn.Module, loss_fn: nn.Module, data: Tensors, batch_size: int) -> float | None:
    """Validation metric with running statistics minus with batch statistics, or None.

    None when the model has no batch-norm-like layer with running statistics. Batch
    statistics come from batches of the training ``batch_size`` (the whole set if smaller;
    a last incomplete batch is left out of both measurements). Running statistics, step
    counters and every module's mode are restored afterwards.
    """
    modules = dict(model.named_modules())
    layers = [modules[name] for name in _running_stat_names(model)]
    x, y = data
    used, size = _gap_batches(len(x), batch_size)
    if not layers or size < 2:
        return None
    x, y = x[:used], y[:used]
    with _restoring(model, layers):
        model.eval()
        running = _metric(model, loss_fn, x, y, len(x))  # per example: one batch will do
        for layer in layers:
            layer.train()
        batch = _metric(model, loss_fn, x, y, size)
    return running - batch


def stacked_eval_gap(
    trainer: StackedTrainer, split: str = "val", layer_names: Sequence[str] | None = None
) -> list[float | None]:
    """:func:`eval_gap` of every member of ``trainer`` on its own ``split``, from the stacked
    evaluation (``trainer.evaluate``); None for inactive members and models without running
    statistics. ``layer_names``: the single model's layers with running statistics (found
    on a freshly built member if not given)."""
    if layer_names is None:
        cfg = trainer.cfg
        single = build_model(cfg.model, cfg.norm, trainer.input_shape, trainer.num_outputs)
        layer_names = _running_stat_names(single)
    splits = [getattr(trainer.data[int(c.seed)], split) for c in trainer.cfgs]
    used, size = _gap_batches(len(splits[0][0]), trainer.batch_size)
    if not layer_names or size < 2 or not trainer.active:
        return [None] * trainer.K
    modules = dict(trainer.net.named_modules())
    layers = [modules[name] for name in layer_names]  # the stacked net keeps the single names
    data = [(x[:used], y[:used]) for x, y in splits]
    with _restoring(trainer.net, layers):
        running = trainer.evaluate(data=data)  # per example: any batch size will do
        batch = trainer.evaluate(data=data, batch_size=size, train_modules=layers)
    pick = 1 if trainer.task == "classification" else 0  # accuracy; the loss for regression
    return [None if r is None else r[pick] - b[pick] for r, b in zip(running, batch, strict=True)]


def _metric(model: nn.Module, loss_fn: nn.Module, x: Tensor, y: Tensor, batch_size: int) -> float:
    """Accuracy for classification, mean loss for regression, in the model's current modes."""
    out = torch.cat([model(xb) for xb in x.split(batch_size)])
    if y.dtype == torch.int64:
        return (out.argmax(1) == y).float().mean().item()
    return loss_fn(out, y).item()
