"""Claims: racing processes split the runs between them; dead or silent holders are replaced."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from normbench.engine import run_claims
from normbench.engine.run_claims import CLAIM_FILE

RUNS = 50  # enough that the two racers overlap in time
ROOT = Path(__file__).resolve().parents[1]
RACER = """
import json, pathlib, sys, time
from normbench.engine.run_claims import claim
root = pathlib.Path(sys.argv[1])
(root / f"ready{sys.argv[2]}").touch()
while not (root / "go").exists():
    time.sleep(0.001)
print(json.dumps([p.name for p in sorted(root.glob("run*")) if claim(p) is not None]))
"""
HOLDER = """
import pathlib, sys, time
from normbench.engine.run_claims import claim
assert claim(pathlib.Path(sys.argv[1])) is not None
print("held", flush=True)
time.sleep(60)
"""


def _python(code: str, *args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True, env=env, **kwargs
    )


def _race(root: Path) -> list[set[str]]:
    racers = [_python(RACER, str(root), str(i)) for i in range(2)]
    while len(list(root.glob("ready*"))) < 2:  # both imported and waiting
        time.sleep(0.01)
    (root / "go").touch()
    return [set(json.loads(racer.communicate(timeout=60)[0])) for racer in racers]


def _foreign_claim(run: Path, age: float) -> None:
    """A claim by a process on another host, last heard from ``age`` seconds ago."""
    run.mkdir(parents=True, exist_ok=True)
    holder = {"host": "elsewhere", "pid": 1, "pid_ns": "", "started": "", "token": run.name}
    (run / CLAIM_FILE).write_text(json.dumps(holder))
    os.utime(run / CLAIM_FILE, (time.time() - age,) * 2)


def _holder(run: Path) -> dict:
    return json.loads((run / CLAIM_FILE).read_text())


def test_racing_processes_claim_disjoint_runs_covering_all(tmp_path: Path):
    runs = {f"run{i:02d}" for i in range(RUNS)}
    for name in runs:
        (tmp_path / name).mkdir()
    first, second = _race(tmp_path)
    assert not first & second
    assert first | second == runs


def test_racing_takers_of_stale_claims_never_both_win(tmp_path: Path):
    runs = {f"run{i:02d}" for i in range(RUNS)}
    for name in runs:
        _foreign_claim(tmp_path / name, age=run_claims.STALE_SECONDS + 60)
    first, second = _race(tmp_path)
    assert not first & second
    assert first | second == runs
    assert not list(tmp_path.glob("run*/.*"))  # no temporary or lock file left


def test_the_claim_of_a_killed_process_is_taken_over(tmp_path: Path):
    run = tmp_path / "run"
    holder = _python(HOLDER, str(run))
    try:
        assert holder.stdout.readline() == "held\n"
        assert run_claims.claim(run) is None  # its holder is alive
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    taken = run_claims.claim(run)
    assert taken is not None
    assert _holder(run)["pid"] == os.getpid()
    assert _holder(run)["host"] == socket.gethostname()


def test_a_fresh_claim_from_another_host_is_respected_and_a_silent_one_is_not(tmp_path: Path):
    _foreign_claim(tmp_path / "fresh", age=5)
    _foreign_claim(tmp_path / "silent", age=run_claims.STALE_SECONDS + 1)
    assert run_claims.claim(tmp_path / "fresh") is None
    assert _holder(tmp_path / "fresh")["host"] == "elsewhere"
    assert run_claims.claim(tmp_path / "silent") is not None
    assert _holder(tmp_path / "silent")["pid"] == os.getpid()


def test_a_held_claim_beats_releases_and_notices_a_takeover(tmp_path: Path):
    run = tmp_path / "run"
    with run_claims.claim(run, stale_after=0.5) as held:  # heartbeat every 0.05 s
        path = run / CLAIM_FILE
        os.utime(path, (0, 0))
        time.sleep(0.3)
        assert time.time() - path.stat().st_mtime < 0.5
        assert run_claims.claim(run, stale_after=0.5) is None
    assert not path.exists()

    held = run_claims.claim(run, stale_after=0.5)
    os.utime(path, (0, 0))  # as if the holder had stalled for a long time
    taker = run_claims.claim(run, stale_after=100.0)
    assert taker is not None
    assert not held.heartbeat()
    held.release()  # leaves the taker's claim alone
    assert _holder(run)["token"] == taker.token
