"""One writer per run folder: ``RUN/.lock`` names the process that holds it.

Two runs writing one folder (a requeued job while the first still runs, a second terminal)
would resume from each other's checkpoints and write every step twice. The lock is a file
created with ``O_CREAT | O_EXCL`` (atomic on local file systems and on NFSv3+, Lustre and
GPFS) holding the holder's pid, host and start time. A lock whose holder is gone is taken
over with a note, but only on the holder's own host: from another host a pid cannot be
checked, so such a lock is refused with a message that says how to remove it by hand. A
SIGTERM (SLURM's preemption or time limit, ``scancel``) removes the lock before the process
ends as SIGTERM ends it, so a job requeued onto another node is not refused.

The reproduction (experiments/reproduce.py) shares out its runs with the same lock under
other names (``RUN/running.pid``, ``OUT/prepare.lock``), asking with :meth:`RunLock.try_acquire`.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

LOCK_NAME = ".lock"


class RunFolderLocked(FileExistsError):
    """Another process holds the run folder; the message names it."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _describe(holder: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return f"pid {holder.get('pid')} on {holder.get('host')}, started {started}"


class RunLock:
    """``acquire()`` before anything is read or written in the folder, ``release()`` on every
    way out. ``created`` tells whether acquiring made the folder (a failed start removes it)."""

    def __init__(self, run_dir: Path, name: str = LOCK_NAME):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / name
        self.me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        self.held, self.created = False, False

    def _read(self) -> dict | None:
        try:
            holder = json.loads(self.path.read_text())
            # A bare pid: the reproduction's running.pid as it was written before it used this lock.
            return {"pid": holder, "host": self.me["host"]} if isinstance(holder, int) else holder
        except FileNotFoundError:
            return None
        except ValueError:  # being written this instant, or a holder killed between creating and writing it
            try:
                young = time.time() - self.path.stat().st_mtime < 10
            except FileNotFoundError:
                return None
            return {} if young else {"pid": -1, "host": self.me["host"]}

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self.me, f)
            f.flush()
            os.fsync(f.fileno())
        return True

    def acquire(self, say=print) -> RunLock:
        self.created = not self.run_dir.exists()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a lost race for a stale lock is retried
            if self._create():
                self.held = True
                self._on_sigterm()
                return self
            holder = self._read()
            if holder is None:
                continue  # released meanwhile
            same_host = holder.get("host") == self.me["host"]
            pid = holder.get("pid")
            if same_host and pid == self.me["pid"]:  # already this process's (taken by an earlier RunLock)
                self.held = True
                return self
            if same_host and isinstance(pid, int) and (pid < 0 or not _alive(pid)):
                # Only one of several racing takers can move the stale file aside.
                aside = self.path.with_name(f"{self.path.name}.stale.{os.getpid()}")
                try:
                    os.rename(self.path, aside)
                except FileNotFoundError:
                    continue
                aside.unlink(missing_ok=True)
                say(f"note: taking over {self.path}, left by {_describe(holder)}, which is no longer running")
                continue
            if same_host or not holder:
                fix = "wait for it to finish, stop it, or use another --out"
            else:
                fix = (f"a process on another host cannot be checked from here: if it is gone, delete "
                       f"{self.path} by hand; else wait for it, stop it, or use another --out")
            self._undo_folder()
            who = _describe(holder) if holder else "a process that is writing its lock file now"
            raise RunFolderLocked(f"{self.run_dir} is in use by another run ({who}, see {self.path}); {fix}")
        self._undo_folder()
        raise RunFolderLocked(f"could not take the lock {self.path}: other processes keep taking it")

    def try_acquire(self, say=print) -> bool:
        """:meth:`acquire` without waiting or raising: True when this process holds the lock
        now (taken, taken over from a dead holder, or already its own), False when another
        process does."""
        try:
            self.acquire(say)
        except RunFolderLocked:
            return False
        return True

    def _on_sigterm(self) -> None:
        self._old_term = None
        if threading.current_thread() is not threading.main_thread():
            return
        old = signal.getsignal(signal.SIGTERM)

        def release_then_terminate(signum, frame):
            self.release()
            if callable(old):
                old(signum, frame)
            elif old != signal.SIG_IGN:  # the default: end as SIGTERM ends a process
                os.kill(os.getpid(), signal.SIGTERM)

        signal.signal(signal.SIGTERM, release_then_terminate)
        self._old_term = old

    def release(self) -> None:
        """Remove the lock if it is still this process's; a folder this run made and left
        empty (a failed start) goes too."""
        if getattr(self, "_old_term", None) is not None:
            signal.signal(signal.SIGTERM, self._old_term)  # also, first, inside the SIGTERM handler
            self._old_term = None
        if self.held:
            holder = self._read()
            if holder and holder.get("pid") == self.me["pid"] and holder.get("host") == self.me["host"]:
                self.path.unlink(missing_ok=True)
            self.held = False
        self._undo_folder()

    def _undo_folder(self) -> None:
        if self.created:
            try:
                self.run_dir.rmdir()  # only when empty
            except OSError:
                pass
