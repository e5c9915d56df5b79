"""How runs train: the one lifecycle around the stacked trainer, and what it writes.

- ``lifecycle``: ``run_experiment`` (``normbench run``, a stack of one) and ``run_group`` (a
  sweep job): skip, check the machine, load data, claim, train in chunks, checkpoint, write;
- ``trainer``: ``StackedTrainer``, K runs differing only in lr and seed trained as one model,
  built from ``layers`` (stacked linear, conv and norm layers), ``recurrent`` (the stacked
  RNN) and ``optim`` (SGD, Adam and the plateau scheduler with one lr per member);
- ``train``: the optimizers' schemas and checks, the device choice, an epoch's statistics;
- ``run_log``, ``checkpoint``, ``run_claims``, ``diagnostics``: one run's rows and files, the
  state to resume from, the claim on a run folder, per-layer statistics during training.

Nothing is imported here, so that ``normbench.engine.run_claims`` stays free of torch for the
CLI and the modules the lifecycle imports (``normbench.checks``, ``normbench.config``) can
import the engine's submodules without a cycle.
"""
