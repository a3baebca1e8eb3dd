"""Follow a git remote: the pull half of GitOps (Argo CD's and Flux's way), for `daemon.follow`.

Every `every` seconds: fetch the branch, then fast-forward the fleet's checkout to it — never a
merge, never a reset. A checkout with local changes to tracked files, or one whose branch has
commits the remote lacks (diverged), is left exactly as it is and the reason is reported: a person
decides. A fast-forward changes the fleet files on disk, and the daemon's watcher does the rest,
so what is applied is always what the files say. Runs in its own thread: a slow fetch never holds
a reconcile pass.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

GIT_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Followed:
    """The outcome of one look at the remote."""

    ok: bool
    message: str
    revision: str = ""  # HEAD after this look
    remote_revision: str = ""
    at: float = 0.0  # time.time()

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class GitError(Exception):
    pass


def _git(root: Path, *args: str) -> str:
    try:
        r = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=GIT_TIMEOUT_S,
                           env={**os.environ, "GIT_TERMINAL_PROMPT": "0"})  # never wait on a password prompt
    except FileNotFoundError as e:
        raise GitError("git is not installed") from e
    except subprocess.TimeoutExpired as e:
        raise GitError(f"`git {args[0]}` took longer than {GIT_TIMEOUT_S:.0f} s") from e
    if r.returncode != 0:
        raise GitError(f"`git {' '.join(args)}` failed: {(r.stderr or r.stdout).strip().splitlines()[-1:]}")
    return r.stdout.strip()


def follow_once(root: Path, remote: str, branch: str) -> Followed:
    """Fetch ``remote``/``branch`` and fast-forward the checkout at ``root`` to it, or say why not."""
    now = time.time()
    try:
        _git(root, "fetch", "--quiet", remote, branch)
        theirs = _git(root, "rev-parse", "FETCH_HEAD")
        ours = _git(root, "rev-parse", "HEAD")
        if ours == theirs:
            return Followed(True, f"up to date with {remote}/{branch}", ours, theirs, now)
        if _git(root, "status", "--porcelain", "--untracked-files=no"):
            return Followed(False, f"{remote}/{branch} has new commits, but the checkout has local changes; "
                            "commit or stash them (nothing was pulled)", ours, theirs, now)
        ahead = int(_git(root, "rev-list", "--count", f"{theirs}..{ours}"))
        if ahead:
            return Followed(False, f"the checkout has {ahead} commit(s) that {remote}/{branch} lacks (diverged); "
                            "push or reset them (nothing was pulled)", ours, theirs, now)
        _git(root, "merge", "--ff-only", "--quiet", theirs)
        return Followed(True, f"fast-forwarded to {remote}/{branch} {theirs[:12]}", theirs, theirs, now)
    except GitError as e:
        return Followed(False, str(e), "", "", now)


def run(root: Path, remote: str, branch: str, every_s: float, stop: threading.Event,
        on_result: Callable[[Followed], None]) -> threading.Thread:
    """A thread looking at the remote every ``every_s`` until ``stop`` is set."""
    def loop() -> None:
        while not stop.is_set():
            on_result(follow_once(root, remote, branch))
            stop.wait(every_s)

    thread = threading.Thread(target=loop, name="fleet-follow", daemon=True)
    thread.start()
    return thread
