"""The SLURM launcher ``normbench sweep`` uses for ``hydra/launcher=submitit_slurm``.

Hydra instantiates launchers only from the ``hydra_plugins`` package, so the class lives
here; what it does is normbench.slurm's (it sets ``hydra.launcher._target_`` to this class).
"""

from normbench.slurm import SlurmArrayLauncher


class SlurmLauncher(SlurmArrayLauncher):
    """hydra-submitit-launcher's SLURM launcher, waiting on its array itself."""
