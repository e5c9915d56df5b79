"""The configs ship inside the wheel and Hydra finds them there, not only in the checkout."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_built_wheel_carries_and_loads_the_configs(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path / "dist"), str(ROOT)],
        check=True, capture_output=True,
    )  # fmt: skip
    (wheel,) = (tmp_path / "dist").glob("normbench-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {n for n in names if n.startswith("normbench/configs/") and n.endswith(".yaml")}
    in_repo = {
        "normbench/configs/" + p.relative_to(ROOT / "configs").as_posix()
        for p in (ROOT / "configs").rglob("*.yaml")
    }
    assert shipped == in_repo
    assert "hydra_plugins/normbench_sweeper/__init__.py" in names  # hydra/sweeper=normbench
    assert "hydra_plugins/normbench_slurm/__init__.py" in names  # the SLURM sweeps' launcher
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    code = (
        "import normbench, sys\n"
        "from normbench.app import compose_config\n"
        "import hydra_plugins.normbench_sweeper as sweeper\n"
        "import hydra_plugins.normbench_slurm as launcher\n"
        "for module in (normbench, sweeper, launcher):\n"
        "    assert module.__file__.startswith(sys.argv[1]), module.__file__\n"
        "cfg = compose_config(['model=lenet', 'norm=batch_renorm'])\n"
        "print(cfg.choices.model, cfg.norm.name)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "site")],
        cwd=tmp_path, env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert out.stdout.split() == ["lenet", "batch_renorm"]
