"""Claims on run folders, so that sweeps running at once share the work instead of repeating it.

A claim is ``<run>/claim.json`` (host, pid, pid namespace, start time, a random token), created
whole and atomically by hard-linking a finished temporary file to that name: of two
processes, exactly one gets it. Its modification time is the heartbeat. A claim is stale
when its heartbeat is older than ``stale_after`` seconds, or when its holder ran on this host
(and pid namespace) and that pid is gone. A stale claim is taken over under a per-claim lock
file, so two takers never both win; a holder that stalled past the timeout finds out at its
next heartbeat. Works on a folder shared between hosts (NFS) as long as their clocks roughly
agree; a taker killed inside the takeover (a few system calls) leaves a lock that is cleared
once it is itself stale.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

CLAIM_FILE = "claim.json"
STALE_SECONDS = 300.0  # a heartbeat older than this means the holder is gone or stuck
_ATTEMPTS = (
    3  # link, take over a stale claim, link again; the third is for a claim released meanwhile
)


class Claim:
    """A claim this process holds; a context manager that keeps it fresh and gives it back."""

    def __init__(self, path: Path, token: str, every: float, made: Sequence[Path] = ()) -> None:
        self.path = path
        self.token = token
        self.every = every
        self.made = list(made)  # folders claim() created, deepest first
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)

    def heartbeat(self) -> bool:
        """Refresh the heartbeat; False when the claim is no longer ours (it was taken over)."""
        if not self._ours():
            return False
        os.utime(self.path)
        return True

    def release(self) -> None:
        """Give the claim back (if it is still ours), and the folders claiming it created if
        they are empty: a run stopped before writing anything (bad input found once claimed,
        such as missing data) leaves no empty run folder or results folder."""
        if self._ours():
            self.path.unlink(missing_ok=True)
            for folder in self.made:
                try:
                    folder.rmdir()
                except OSError:  # it holds something (the run's files, another run)
                    break

    def __enter__(self) -> Claim:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.release()

    def _ours(self) -> bool:
        return (_read(self.path) or {}).get("token") == self.token

    def _beat(self) -> None:
        while not self._stop.wait(self.every) and self.heartbeat():
            pass


def claim(run_path: Path, stale_after: float = STALE_SECONDS) -> Claim | None:
    """Claim ``run_path`` for this process; None when a live holder has it.

    The holder should heartbeat more often than ``stale_after``: used as a context manager,
    the claim refreshes itself every tenth of it.
    """
    path = run_path / CLAIM_FILE
    mine = _holder()
    tmp = run_path / f".{CLAIM_FILE}.{mine['token']}.claiming"  # not *.tmp: clear_run removes those
    for attempt in range(_ATTEMPTS):
        made = [folder for folder in (run_path, *run_path.parents) if not folder.exists()]
        run_path.mkdir(parents=True, exist_ok=True)
        try:
            tmp.write_text(json.dumps(mine))
            break
        except FileNotFoundError:  # a releasing holder removed the empty folder meanwhile
            if attempt == _ATTEMPTS - 1:
                raise
    try:
        for _ in range(_ATTEMPTS):
            if _link(tmp, path):
                return Claim(path, mine["token"], stale_after / 10, made)
            holder = _read(path)
            if holder is None:  # released in the meantime
                continue
            if not (
                _is_stale(path, holder, stale_after) and _take_over(path, holder, tmp, stale_after)
            ):
                return None
        return None
    finally:
        tmp.unlink(missing_ok=True)


def describe_holder(run_path: Path) -> str:
    """`` (pid 123)``, `` (pid 123 on host h)`` for a foreign host, or '' when no claim is
    readable: who is training the run at ``run_path``."""
    holder = _read(run_path / CLAIM_FILE) or {}
    if "pid" not in holder:
        return ""
    host = holder.get("host")
    where = f" on host {host}" if host and host != socket.gethostname() else ""
    return f" (pid {holder['pid']}{where})"


def _take_over(path: Path, holder: dict[str, Any], tmp: Path, stale_after: float) -> bool:
    """Remove ``holder``'s stale claim at ``path`` unless another taker is at it (then False)."""
    token = holder.get("token")
    lock = path.with_name(f".{CLAIM_FILE}.{token}.takeover")
    if not _link(tmp, lock):
        other = _read(lock)
        if other is not None and _is_stale(lock, other, stale_after):  # its taker died
            lock.unlink(missing_ok=True)
        return False
    try:
        # Check again under the lock: since we looked, the claim may have been taken over
        # (another token now) or refreshed by a holder that was only slow.
        current = _read(path)
        if (
            current is not None
            and current.get("token") == token
            and _is_stale(path, current, stale_after)
        ):
            path.unlink(missing_ok=True)
        return True
    finally:
        lock.unlink(missing_ok=True)


def _is_stale(path: Path, holder: dict[str, Any], stale_after: float) -> bool:
    try:
        if time.time() - path.stat().st_mtime > stale_after:
            return True
    except FileNotFoundError:
        return False
    here = holder.get("host") == socket.gethostname() and holder.get("pid_ns") == _pid_namespace()
    return here and not _alive(holder.get("pid"))


def _alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except (TypeError, ValueError, OverflowError):  # not a pid: an edited or foreign file
        return False
    return True


def _holder() -> dict[str, Any]:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "pid_ns": _pid_namespace(),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "token": uuid.uuid4().hex,
    }


def _pid_namespace() -> str:
    """Containers on one host can share a host name but not pids; '' where there is no /proc."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _link(source: Path, target: Path) -> bool:
    try:
        os.link(source, target)
    except FileExistsError:
        return False
    return True


def _read(path: Path) -> dict[str, Any] | None:
    """The holder recorded at ``path``: None when there is none, {} when it is unreadable."""
    try:
        holder = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}
