"""The last fleet files that were valid, kept on disk beside the other state files.

A daemon that starts while the files are broken (a bad merge, a half-saved edit) still knows what
the fleet should be: it reconciles toward this copy, heals drift from it, and says on its page
which files and which revision it holds to. One copy per fleet folder; written only when the valid
files differ from the copy, atomically (a new folder, then a rename), so a reader never sees half.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reconciler import state_files
from reconciler.desired.pipeline import DesiredState, desired_state
from reconciler.errors import SpecError

META = "last-good.json"


@dataclass(frozen=True)
class Copy:
    folder: Path  # holds fleet.yaml and fleet.d/ as they were
    root: str  # the fleet folder they came from (relative model paths resolve against it)
    files: tuple[str, ...]
    saved_at: float
    revision: dict[str, Any] | None  # git commit of the fleet folder then, if any

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.saved_at))
        rev = f", commit {str(self.revision['commit'])[:12]}" if self.revision else ""
        return f"{', '.join(self.files)} as they were valid at {when}{rev}"

    def as_dict(self) -> dict[str, Any]:
        return {"files": list(self.files), "saved_at": self.saved_at, "revision": self.revision}


def folder_for(root: Path) -> Path:
    key = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]
    return state_files.last_good(key)


def _digest(root: Path, files: tuple[str, ...]) -> str:
    h = hashlib.sha256()
    for name in files:
        h.update(name.encode() + b"\0")
        with contextlib.suppress(OSError):
            h.update((root / name).read_bytes())
    return h.hexdigest()


def save(root: Path, files: tuple[str, ...], revision: dict[str, Any] | None) -> bool:
    """Keep these (just validated) files of the fleet at ``root``; False when the copy is already them."""
    target = folder_for(root)
    digest = _digest(root, files)
    with contextlib.suppress(OSError, ValueError):
        if json.loads((target / META).read_text()).get("digest") == digest:
            return False
    tmp = Path(tempfile.mkdtemp(prefix=".last-good-", dir=target.parent))
    try:
        for name in files:
            dest = tmp / (Path(name).name if Path(name).is_absolute() or ".." in Path(name).parts else name)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(root / name, dest)
        meta = {"root": str(root.resolve()), "files": list(files), "saved_at": time.time(),
                "revision": revision, "digest": digest}
        (tmp / META).write_text(json.dumps(meta))
        old = target.with_name(target.name + f".old-{os.getpid()}")
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        return False
    return True


def load(root: Path) -> Copy | None:
    """The kept copy for the fleet at ``root``, or None when there is none (or it is unreadable)."""
    target = folder_for(root)
    try:
        meta = json.loads((target / META).read_text())
        return Copy(target, str(meta["root"]), tuple(meta["files"]), float(meta["saved_at"]), meta.get("revision"))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def desired(root: Path) -> tuple[DesiredState, Copy] | None:
    """The desired state of the kept copy for the fleet at ``root`` (relative model paths resolved
    against ``root`` as it was), or None when there is no valid copy."""
    copy = load(root)
    if copy is None:
        return None
    try:
        return desired_state(copy.folder / Path(copy.files[0]).name, root=copy.root), copy
    except SpecError:
        return None
