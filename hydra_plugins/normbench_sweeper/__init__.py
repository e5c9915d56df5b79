"""``hydra/sweeper=normbench``: Hydra's basic sweeper, without composing every job twice.

Before launching each batch, Hydra's basic sweeper composes every job's config to fail early
on a bad override, and the launcher then composes it again to run it: two compositions per
job (~85 ms each, longer than a small run trains). ``normbench sweep`` has composed and
checked every job of the grid before launching anything (normbench.sweep.plan_sweep), so
this sweeper leaves that check out. Everything else is the basic sweeper's. Hydra finds it
in the ``hydra_plugins`` namespace of an installed wheel, as it finds every sweeper plugin;
normbench.app registers it too, for editable installs, where Hydra's scan cannot see it.
"""

# No ``from __future__ import annotations``: Hydra executes this module before it is in
# sys.modules, where dataclasses would look string annotations up.
from collections.abc import Sequence
from dataclasses import dataclass

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper, BasicSweeperConf
from hydra.core.config_store import ConfigStore


@dataclass
class PlannedSweeperConf(BasicSweeperConf):
    _target_: str = "hydra_plugins.normbench_sweeper.PlannedSweeper"


ConfigStore.instance().store(
    group="hydra/sweeper", name="normbench", node=PlannedSweeperConf, provider="normbench"
)


class PlannedSweeper(BasicSweeper):
    """The basic sweeper for grids that ``normbench sweep`` has already checked."""

    def validate_batch_is_legal(self, batch: Sequence[Sequence[str]]) -> None:
        """Nothing to do: planning composed and checked every job."""
