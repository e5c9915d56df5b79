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
"""

from __future__ import annotations

from functools import lru_cache, partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from normbench import norms, results

Tensors = tuple[Tensor, Tensor]

# Percentiles of a larger pre-activation come from a fixed random subsample of this many values.
QUANTILE_SAMPLE = 16_384


class Recorder:
    """Records diagnostics of ``model`` (a normbench Net: ``model.blocks`` of Block) into rows.

    Pass :meth:`on_step` as ``train_one_epoch``'s ``on_step``, call :meth:`end_epoch` after
    each epoch, :meth:`close` at the end, then :meth:`write`.
    """

    def __init__(self, model: nn.Module, run_id: str, every: int) -> None:
        self.model, self.run_id, self.every = model, run_id, every
        self.rows: list[dict[str, Any]] = []
        self.step = 0  # optimizer steps taken so far
        self.epoch = 1
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._pending: list[tuple[str, str, Tensor]] = []
        self._arm()

    def on_step(self, model: nn.Module, steps: int) -> None:
        """After each optimizer step: finish a recording step, arm the hooks before the next."""
        if self._handles:
            for index, block in enumerate(self.model.blocks):
                grad = block.layer.weight.grad
                if grad is not None:
                    self._pending.append((f"block{index}", "grad_norm", grad.norm()))
            self._flush()
            self._disarm()
        self.step += 1
        if self.step % self.every == 0:
            self._arm()

    def end_epoch(self, val: Tensors, loss_fn: nn.Module, batch_size: int) -> None:
        """Record the epoch's ``eval_gap`` (if the model has running statistics)."""
        gap = eval_gap(self.model, loss_fn, val, batch_size)
        if gap is not None:
            self.rows.append(self._row("model", "eval_gap", gap))
        self.epoch += 1

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps, so a resumed run records as if never interrupted."""
        return {"rows": self.rows, "step": self.step, "epoch": self.epoch}

    def restore(self, state: dict[str, Any]) -> None:
        self.rows, self.step, self.epoch = state["rows"], state["step"], state["epoch"]
        self._disarm()
        if self.step % self.every == 0:
            self._arm()

    def close(self) -> None:
        """Remove any hooks still registered."""
        self._disarm()

    def write(self, path: Path) -> None:
        if self.rows:
            results.atomic_write_csv(path, self.rows, results.DIAGNOSTIC_COLUMNS)
        else:  # a linear model records nothing; the header still says what the file is
            results.atomic_write_text(path, ",".join(results.DIAGNOSTIC_COLUMNS) + "\n")

    def _arm(self) -> None:
        blocks = self.model.blocks
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
            x = args[0].detach()
            self._pending += [(layer, "input_mean", x.mean()), (layer, "input_std", x.std())]

    def _percentiles(self, block: nn.Module, layer: str, _module: nn.Module, args) -> None:
        if block.training:
            x = args[0].detach().flatten()
            if x.numel() > QUANTILE_SAMPLE:
                x = x[_sample_index(x.numel(), x.device)]
            levels = torch.tensor(
                list(results.PERCENTILES.values()), dtype=x.dtype, device=x.device
            )
            q = torch.quantile(x, levels)
            self._pending += [
                (layer, name, value) for name, value in zip(results.PERCENTILES, q, strict=True)
            ]

    def _flush(self) -> None:
        """Turn the step's tensors into rows with one device sync."""
        if not self._pending:
            return
        values = torch.stack([value for _, _, value in self._pending])
        for (layer, quantity, _), value in zip(self._pending, values.tolist(), strict=True):
            self.rows.append(self._row(layer, quantity, value))
        self._pending.clear()

    def _row(self, layer: str, quantity: str, value: float) -> dict[str, Any]:
        return dict(
            run_id=self.run_id,
            epoch=self.epoch,
            step=self.step,
            layer=layer,
            quantity=quantity,
            value=value,
        )


@lru_cache(maxsize=8)
def _sample_index(numel: int, device: torch.device) -> Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(numel, (QUANTILE_SAMPLE,), generator=generator).to(device)


@torch.no_grad()
def eval_gap(model: nn.Module, loss_fn: nn.Module, data: Tensors, batch_size: int) -> float | None:
    """Validation metric with running statistics minus with batch statistics, or None.

    None when the model has no batch-norm-like layer with running statistics. Batch
    statistics come from batches of the training ``batch_size`` (the whole set if smaller;
    a last incomplete batch is left out of both measurements). Running statistics, step
    counters and every module's mode are restored afterwards.
    """
    layers = [m for m in model.modules() if norms.is_batch_norm(m) and m.running_mean is not None]
    x, y = data
    size = min(batch_size, len(x))
    if not layers or size < 2:
        return None
    used = len(x) // size * size
    x, y = x[:used], y[:used]
    modes = [(module, module.training) for module in model.modules()]
    saved = [[buffer.clone() for buffer in layer.buffers()] for layer in layers]
    try:
        model.eval()
        running = _metric(model, loss_fn, x, y, len(x))  # per example: one batch will do
        for layer in layers:
            layer.train()
        batch = _metric(model, loss_fn, x, y, size)
    finally:
        for layer, buffers in zip(layers, saved, strict=True):
            for buffer, copy in zip(layer.buffers(), buffers, strict=True):
                buffer.copy_(copy)
        for module, mode in modes:
            module.training = mode
    return running - batch


def _metric(model: nn.Module, loss_fn: nn.Module, x: Tensor, y: Tensor, batch_size: int) -> float:
    """Accuracy for classification, mean loss for regression, in the model's current modes."""
    out = torch.cat([model(xb) for xb in x.split(batch_size)])
    if y.dtype == torch.int64:
        return (out.argmax(1) == y).float().mean().item()
    return loss_fn(out, y).item()
