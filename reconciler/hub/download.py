"""Model files from the Hugging Face Hub into the cache the engines read, before an engine needs them.

One job: for an ``hf://`` source, *measure* what the cache still lacks (the Hub's file list with
sizes, one API call, kept to the files vLLM loads: ``serve_app.model_source.vllm_files``), *check*
the disk has room for it, and *fetch* it resumably with progress.
`fleetctl pull` and `reconcile()` (before it touches Serve) call this; `plan` shows the measure;
`status` reads the progress file a running fetch keeps (reconciler.state_files).

Everything on the wire is huggingface_hub's: ``HfApi.model_info`` for the listing,
``get_hf_file_metadata`` for a file's etag and location, ``http_get`` (its Range-resume) for the
bytes, and ``snapshot_download`` to finish the snapshot (refs, symlinks) from the blobs placed
here. We own only where a partial file waits: huggingface_hub 2.x downloads into a process-unique
temporary file and deletes it on failure, so an interrupted `pull` would start again from zero;
here each blob grows in ``blobs/<etag>.fleet-partial`` (under a file lock) and the next pull
continues it with a Range request. A blob whose etag is a sha256 (LFS files) is verified before it
enters the cache.

The cache is the engines' one: ``HF_HUB_CACHE``, else ``HF_HOME``/hub, taken from the model's
``env`` in the fleet file when it sets them, else from this process's environment (the Ray node's,
which the engines inherit, on a box where `fleetctl up` started it). The token is huggingface_hub's
own (``HF_TOKEN`` or a stored login); nothing here prints it, and messages are scrubbed of it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from glob import escape as glob_escape
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from reconciler import state_files
from reconciler.change.plan import Action, Download, Plan
from reconciler.desired.placement import PlacedFleet, PlacedModel
from reconciler.errors import FleetError
from reconciler.fleetfiles.units import format_size as format_bytes
from serve_app import source as sources
from serve_app.model_source import vllm_files

PARTIAL_SUFFIX = ".fleet-partial"
PROGRESS_EVERY_S = 0.5
# huggingface_hub reads 10 MB at a time and writes nothing of a chunk a cut connection broke off;
# 1 MiB reads bound what an interrupted pull loses (and make progress smoother).
READ_CHUNK = 1 << 20  # the progress file is rewritten at most this often
_ENV_REF = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_]*)\}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class DownloadError(FleetError):
    """A model's files could not be measured or fetched; the message says why and what to do."""


class NoSpaceError(DownloadError):
    """The disk holding the cache has less free space than the files still to fetch."""

    def __init__(self, needed: int, free: int, where: Path, models: Sequence[str]) -> None:
        self.needed, self.free, self.where, self.models = needed, free, where, tuple(models)
        super().__init__(
            f"not enough disk space for {', '.join(models)}: {format_bytes(needed)} to download, "
            f"{format_bytes(free)} free on the disk of {where} (short by {format_bytes(needed - free)}); "
            "nothing was downloaded. Free some space there, or move the Hugging Face cache to a larger disk "
            "(HF_HOME or HF_HUB_CACHE, for fleetctl and for the Ray node the engines run on)")


@dataclass(frozen=True)
class RepoFile:
    path: str
    size: int
    etag: str  # the blob's name in the cache: the LFS sha256, else the git blob id
    have: int  # bytes already on disk: size when cached, the partial file's length when begun

    @property
    def missing(self) -> int:
        return max(self.size - self.have, 0)


@dataclass(frozen=True)
class ModelFiles:
    """One hf:// model's files at one commit, and how much of them the cache holds."""

    model: str
    source: str
    repo: str
    revision: str | None
    commit: str
    cache_dir: Path
    files: tuple[RepoFile, ...]

    @property
    def total(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def missing(self) -> int:
        return sum(f.missing for f in self.files)

    @property
    def storage(self) -> Path:
        return self.cache_dir / ("models--" + self.repo.replace("/", "--"))


@dataclass(frozen=True)
class Progress:
    """A snapshot of one model's fetch, sent to the caller's callback."""

    event: str  # "model" (starting), "file" (a file starts), "bytes", "file_done", "model_done"
    model: str
    done: int  # bytes of the model on disk
    total: int
    file: str = ""
    file_done: int = 0
    file_total: int = 0
    files_done: int = 0
    files_total: int = 0


OnProgress = Callable[[Progress], None]


def is_hub_source(source: str) -> bool:
    return sources.hub(source) is not None


def hub_sources(model: PlacedModel) -> list[tuple[str, str]]:
    """What `pull` fetches for a model: its hf:// source, then its hf:// LoRA adapters' (labelled
    ``model/adapter``), each as (label, source)."""
    own = [(model.name, model.source)] if is_hub_source(model.source) else []
    return own + [(f"{model.name}/{name}", source) for name, source in model.adapters.items() if is_hub_source(source)]


# ---- where, and who ------------------------------------------------------------------------

def _env_value(env: Mapping[str, str], name: str) -> str | None:
    """A model env value as the engine sees it: ``"${X}"`` is X from the environment."""
    value = env.get(name)
    if value is None:
        return None
    m = _ENV_REF.match(value)
    return os.environ.get(m.group(1)) if m else value


def hub_cache_dir(env: Mapping[str, str] | None = None) -> Path:
    """The Hugging Face hub cache an engine with this model env reads (see the module doc)."""
    env = env or {}
    for name, suffix in (("HF_HUB_CACHE", ""), ("HF_HOME", "hub")):
        value = _env_value(env, name)
        if value:
            return Path(value, suffix).expanduser()
    from huggingface_hub import constants

    return Path(os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE).expanduser()


def _token(env: Mapping[str, str] | None) -> str | None:
    """The model env's HF_TOKEN when it names one; None lets huggingface_hub find HF_TOKEN itself."""
    return _env_value(env or {}, "HF_TOKEN") or None


def scrub(text: str, env: Mapping[str, str] | None = None) -> str:
    """``text`` with any token we might hold replaced, so no message ever carries it."""
    from huggingface_hub import get_token

    for secret in {os.environ.get("HF_TOKEN"), _token(env), get_token()}:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return text


def parse(source: str) -> tuple[str, str | None]:
    hub = sources.hub(source)
    if hub is None:
        raise DownloadError(f"{source!r} is not an hf://org/name[@revision] source")
    return hub.repo, hub.revision


# ---- measure --------------------------------------------------------------------------------

def measure(model: str, source: str, env: Mapping[str, str] | None = None) -> ModelFiles:
    """The model's files at its revision and what the cache lacks (one Hub API call)."""
    from huggingface_hub import HfApi

    repo, revision = parse(source)
    cache = hub_cache_dir(env)
    try:
        info = HfApi().model_info(repo, revision=revision, files_metadata=True, token=_token(env))
    except Exception as e:
        raise _hub_error(model, source, e, env) from None
    if not info.sha:
        raise DownloadError(f"{model}: the Hub answered no commit for {source}")
    storage = cache / ("models--" + repo.replace("/", "--"))
    files = []
    wanted = set(vllm_files(s.rfilename for s in info.siblings or []))
    for s in info.siblings or []:
        if s.rfilename not in wanted:  # another copy of the weights (original/*.pth, ONNX …): vLLM never reads it
            continue
        etag = s.lfs.sha256 if s.lfs else (s.blob_id or "")
        size = int((s.lfs.size if s.lfs else s.size) or 0)
        files.append(RepoFile(s.rfilename, size, etag, _have(storage, info.sha, s.rfilename, etag, size)))
    return ModelFiles(model, source, repo, revision, info.sha, cache, tuple(files))


def _have(storage: Path, commit: str, path: str, etag: str, size: int) -> int:
    if (storage / "snapshots" / commit / path).exists() or (etag and (storage / "blobs" / etag).exists()):
        return size
    partial = storage / "blobs" / (etag + PARTIAL_SUFFIX)
    return min(partial.stat().st_size, size) if etag and partial.exists() else 0


def cached_offline(source: str, env: Mapping[str, str] | None = None) -> bool:
    """True when the cache holds a complete snapshot of the source (no network; used when the Hub
    cannot be asked)."""
    from huggingface_hub import snapshot_download

    repo, revision = parse(source)
    try:
        snapshot_download(repo, revision=revision, cache_dir=str(hub_cache_dir(env)), local_files_only=True)
    except Exception:
        return False
    return True


def _hub_error(model: str, source: str, e: Exception, env: Mapping[str, str] | None) -> DownloadError:
    from huggingface_hub import constants
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    if isinstance(e, GatedRepoError):
        hint = "the repository is gated: accept its terms on the Hub and set HF_TOKEN to a token that may read it"
    elif isinstance(e, RepositoryNotFoundError):
        hint = "no such repository, or it is private: check the name, or set HF_TOKEN to a token that may read it"
    elif isinstance(e, RevisionNotFoundError):
        hint = "the repository has no such revision: check the part after @"
    elif constants.is_offline_mode():
        hint = "HF_HUB_OFFLINE is set: unset it to download"
    else:
        hint = f"is the Hub ({constants.ENDPOINT}) reachable from here? HF_ENDPOINT points at a mirror"
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return DownloadError(scrub(f"{model}: cannot list {source} on the Hub: {first} — {hint}", env))


# ---- check ----------------------------------------------------------------------------------

def free_space(path: Path) -> tuple[int, Path]:
    """Free bytes on the disk that holds (or will hold) ``path``, and the folder that was asked."""
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free, p


def check_space(items: Sequence[ModelFiles]) -> None:
    """Raise NoSpaceError when the files still to fetch do not fit where they go."""
    by_disk: dict[int, tuple[int, Path, list[str]]] = {}
    for mf in items:
        if not mf.missing:
            continue
        free, where = free_space(mf.storage)
        dev = where.stat().st_dev
        needed, _, names = by_disk.get(dev, (0, where, []))
        by_disk[dev] = (needed + mf.missing, where, [*names, mf.model])
    for needed, where, names in by_disk.values():
        free, _ = free_space(where)
        if needed > free:
            raise NoSpaceError(needed, free, where, names)


# ---- fetch ----------------------------------------------------------------------------------

def pull(mf: ModelFiles, on_progress: OnProgress | None = None, env: Mapping[str, str] | None = None) -> Path:
    """Fetch what the cache lacks of ``mf`` (after check_space), then finish the snapshot. Returns
    the snapshot folder. Resumes a partial file left by an interrupted pull."""
    from huggingface_hub import constants, snapshot_download

    constants.DOWNLOAD_CHUNK_SIZE = min(constants.DOWNLOAD_CHUNK_SIZE, READ_CHUNK)
    report = on_progress or (lambda _p: None)
    state = _Tally(mf, report)
    state.emit("model")
    for f in mf.files:
        if f.missing:
            _fetch_file(mf, f, state, env)
        state.file_finished(f)
    try:  # refs/<revision> and snapshots/<commit>/<file> links, from the blobs now in place
        folder = snapshot_download(mf.repo, revision=mf.revision, cache_dir=str(mf.cache_dir),
                                   allow_patterns=[glob_escape(f.path) for f in mf.files],
                                   token=_token(env), tqdm_class=_silent_tqdm())
    except Exception as e:
        raise DownloadError(scrub(f"{mf.model}: finishing the snapshot of {mf.source} failed: {e}", env)) from None
    state.emit("model_done")
    return Path(folder)


@dataclass
class _Tally:
    mf: ModelFiles
    report: OnProgress
    done: int = 0
    files_done: int = 0
    current: RepoFile | None = None
    current_done: int = 0

    def __post_init__(self) -> None:
        self.done = sum(f.have for f in self.mf.files)

    def emit(self, event: str) -> None:
        f = self.current
        self.report(Progress(event, self.mf.model, self.done, self.mf.total, f.path if f else "",
                             self.current_done, f.size if f else 0, self.files_done, len(self.mf.files)))

    def file_started(self, f: RepoFile, on_disk: int) -> None:
        self.current, self.current_done = f, on_disk
        self.done += on_disk - f.have  # a partial file may have grown since it was measured
        self.emit("file")

    def advance(self, n: int) -> None:
        self.current_done += n
        self.done += n
        self.emit("bytes")

    def file_finished(self, f: RepoFile) -> None:
        self.files_done += 1
        if self.current is f:
            self.done += f.size - self.current_done  # e.g. a blob another process finished meanwhile
            self.current_done = f.size
            self.emit("file_done")
        self.current = None


def _start_without_sigint(thread: threading.Thread) -> None:
    """Start ``thread`` (and so every thread it starts) with SIGINT blocked: the kernel then gives
    Ctrl-C only to the main thread, which is never left waiting in a stalled read for it."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        thread.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def pull_interruptibly(mf: ModelFiles, on_progress: OnProgress | None = None,
                       env: Mapping[str, str] | None = None) -> Path:
    """``pull`` in a worker thread while this (main) thread waits in short joins, so Ctrl-C ends it at once.

    A download stalled in a socket read holds the thread that reads; a SIGINT the kernel hands to any
    other thread (those the HTTP libraries start inherit the mask of their creator) only sets Python's
    flag and leaves the main thread in its read until the read times out. So the worker, and every
    thread it starts, runs with SIGINT blocked: the kernel can only give Ctrl-C to the main thread,
    which raises KeyboardInterrupt within a join; the worker is a daemon thread, ended with the
    process, and the partial file stays for the next pull to continue."""
    result: dict[str, Any] = {}

    def work() -> None:
        try:
            result["path"] = pull(mf, on_progress, env)
        except BaseException as e:  # handed to the main thread
            result["error"] = e

    worker = threading.Thread(target=work, name=f"pull-{mf.model}", daemon=True)
    _start_without_sigint(worker)
    while worker.is_alive():
        worker.join(0.2)
    if "error" in result:
        raise result["error"]
    return Path(result["path"])


def _fetch_file(mf: ModelFiles, f: RepoFile, state: _Tally, env: Mapping[str, str] | None) -> None:
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    token = _token(env)
    url = hf_hub_url(mf.repo, f.path, revision=mf.commit)
    try:
        meta = get_hf_file_metadata(url, token=token)
    except Exception as e:
        raise _hub_error(mf.model, f"{mf.source} ({f.path})", e, env) from None
    etag = meta.etag or f.etag
    blobs = mf.storage / "blobs"
    blob, partial = blobs / etag, blobs / (etag + PARTIAL_SUFFIX)
    blobs.mkdir(parents=True, exist_ok=True)
    with _locked(blobs / (etag + ".fleet-lock")):  # one writer per partial file, across processes
        if blob.exists():
            state.file_started(f, f.size)
            return
        headers = build_hf_headers(token=token)
        location = meta.location or url
        if urlsplit(location).netloc != urlsplit(url).netloc:
            headers.pop("authorization", None)  # a signed CDN address: the token stays with the Hub
        expected = meta.size if meta.size is not None else f.size
        with open(partial, "ab") as out:
            on_disk = out.tell()
            if on_disk > expected:  # not this file after all: start it again
                out.truncate(0)
                on_disk = 0
            state.file_started(f, on_disk)
            try:
                http_get(location, out, resume_size=on_disk, headers=headers, expected_size=expected,
                         displayed_filename=f.path, tqdm_class=_bar_class(state))
            except Exception as e:
                raise DownloadError(scrub(
                    f"{mf.model}: downloading {f.path} stopped at {format_bytes(out.tell())} of "
                    f"{format_bytes(expected)}: {e}; run `fleetctl pull {mf.model}` again to continue", env)) from None
        if _SHA256.match(etag) and _sha256(partial) != etag:
            partial.unlink(missing_ok=True)
            raise DownloadError(f"{mf.model}: {f.path} does not match its checksum on the Hub (sha256 {etag}); "
                                "the partial file was removed: run the pull again")
        os.replace(partial, blob)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _bar_class(state: _Tally) -> Callable[..., Any]:
    """What http_get calls as its tqdm class: our tally instead of a bar on the terminal."""

    class _Bar:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            pass

        def __enter__(self) -> _Bar:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

        def update(self, n: float | None = 1) -> None:
            state.advance(int(n or 0))

        def close(self) -> None:
            return None

    return _Bar


def _silent_tqdm() -> Any:
    from huggingface_hub.utils import tqdm as hf_tqdm

    class _Silent(hf_tqdm):  # type: ignore[misc,valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return _Silent


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # released when the file closes, also if we crash
        yield


# ---- a plan's downloads (plan shows them, reconcile fetches them before touching Serve) ----------

def plan_models(plan: Plan, placed: PlacedFleet) -> list[PlacedModel]:
    """The hf:// models a plan creates or restarts: their engines start, so their files must be here."""
    by_name = {m.name: m for m in placed.models}
    return [by_name[c.model] for c in plan.changes
            if c.action in (Action.CREATE, Action.RESTART) and c.model in by_name
            and is_hub_source(by_name[c.model].source)]


def annotate(plan: Plan, placed: PlacedFleet) -> Plan:
    """The plan with each created/restarted hf:// model's download size (one Hub call per model)."""
    sizes: dict[str, Download] = {}
    for m in plan_models(plan, placed):
        try:
            mf = measure(m.name, m.source, m.env)
            sizes[m.name] = Download(m.source, mf.total, mf.missing)
        except DownloadError as e:
            if cached_offline(m.source, m.env):
                sizes[m.name] = Download(m.source, None, 0, "the Hub could not be asked")
            else:
                sizes[m.name] = Download(m.source, None, None, str(e).split(": ", 1)[-1])
    if not sizes:
        return plan
    return replace(plan, changes=tuple(replace(c, download=sizes.get(c.model, c.download)) for c in plan.changes))


def fetch_for_plan(plan: Plan, placed: PlacedFleet, report: Callable[[str], None]) -> list[str]:
    """Fetch every created/restarted hf:// model's missing files, its adapters' and those an edit adds
    (space checked first for all of them), reporting a line per file and every few seconds. Returns
    the models (and model/adapter) fetched.
    Raises DownloadError (NoSpaceError) when a model cannot be fetched and is not cached."""
    needs: list[ModelFiles] = []
    envs: dict[str, Mapping[str, str]] = {}
    for label, source, env in plan_sources(plan, placed):
        envs[label] = env
        try:
            needs.append(measure(label, source, env))
        except DownloadError:
            if not cached_offline(source, env):
                raise
            report(f"{label}: the Hub cannot be asked, but {source} is in the cache; using it")
    todo = [mf for mf in needs if mf.missing]
    check_space(todo)
    lines = LineReporter(report)
    with ProgressFile(placed.ray.dashboard_url, then=lines) as progress:
        for mf in todo:
            report(f"{mf.model}: downloading {format_bytes(mf.missing)} of {mf.source} before starting it")
            pull(mf, progress, envs[mf.model])
    return [mf.model for mf in todo]


_ADAPTER_FIELD = "deployments.engine.user_config.adapters."


def plan_sources(plan: Plan, placed: PlacedFleet) -> list[tuple[str, str, Mapping[str, str]]]:
    """(label, hf:// source, env) that apply fetches first: every created or restarted model's own and its
    adapters' (reconciler.hub.download.hub_sources), and each hf:// adapter an in-place change adds."""
    by_name = {m.name: m for m in placed.models}
    out = []
    for c in plan.changes:
        m = by_name.get(c.model)
        if m is None:
            continue
        if c.action in (Action.CREATE, Action.RESTART):
            out += [(label, source, m.env) for label, source in hub_sources(m)]
        elif c.action is Action.UPDATE:
            added = {f.path.removeprefix(_ADAPTER_FIELD) for f in c.fields
                     if f.path.startswith(_ADAPTER_FIELD) and f.before is None}
            out += [(f"{m.name}/{a}", src, m.env) for a, src in m.adapters.items()
                    if a in added and is_hub_source(src)]
    return out


@dataclass
class LineReporter:
    """Progress as plain lines: a file's start and end, and the model's share every few seconds."""

    report: Callable[[str], None]
    every_s: float = 5.0
    _last: float = 0.0
    _t0: float = field(default_factory=time.monotonic)

    def __call__(self, p: Progress) -> None:
        now = time.monotonic()
        if p.event == "model":
            self._t0 = self._last = now
        elif p.event == "file":
            self.report(f"  {p.model}: {p.file} ({format_bytes(p.file_total)})"
                        + (f", continuing at {format_bytes(p.file_done)}" if p.file_done else ""))
        elif p.event == "bytes" and now - self._last >= self.every_s:
            self._last = now
            self.report(f"  {p.model}: {percent(p.done, p.total)} ({format_bytes(p.done)} of "
                        f"{format_bytes(p.total)}), {p.file} {percent(p.file_done, p.file_total)}")
        elif p.event == "model_done":
            self.report(f"  {p.model}: {format_bytes(p.total)} in the cache ({now - self._t0:.0f} s)")


def percent(done: int, total: int) -> str:
    return f"{100 * done / total:.0f}%" if total else "100%"


# ---- the progress file status reads ------------------------------------------------------------

class ProgressFile:
    """Keeps ``pull-<fleet>.json`` (reconciler.state_files) while a fetch runs; `status` reads it.

    Use as the on_progress callback (it passes each event on to ``then``) inside ``with``. The
    file is rewritten at most every PROGRESS_EVERY_S by a small thread, so a stalled download
    still shows the last byte that arrived."""

    def __init__(self, dashboard_url: str, then: OnProgress | None = None) -> None:
        self.path = state_files.pull_progress(dashboard_url)
        self.then = then
        self.models: dict[str, dict[str, Any]] = {}
        self.started_at = time.time()
        self._dirty = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._writer, name="pull-progress", daemon=True)

    def __enter__(self) -> ProgressFile:
        # One delivered here left the main thread in a stalled download's read until its timeout.
        _start_without_sigint(self._thread)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._dirty.set()
        self._thread.join(5)
        self.path.unlink(missing_ok=True)

    def __call__(self, p: Progress) -> None:
        with self._lock:
            row = {k: v for k, v in asdict(p).items() if k not in ("event", "model")}
            row["state"] = "downloaded" if p.event == "model_done" else "downloading"
            self.models[p.model] = row
        self._dirty.set()
        if self.then is not None:
            self.then(p)

    def _writer(self) -> None:
        while not self._stop.is_set():
            self._dirty.wait()
            if self._stop.is_set():
                return
            self._dirty.clear()
            with self._lock:
                doc = {"pid": os.getpid(), "started_at": self.started_at, "updated_at": time.time(),
                       "models": {k: dict(v) for k, v in self.models.items()}}
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(doc))
            os.replace(tmp, self.path)  # readers never see half a file
            self._stop.wait(PROGRESS_EVERY_S)


def read_progress(dashboard_url: str) -> dict[str, dict[str, Any]]:
    """Per model, the download a running pull reports ({} when none runs; a dead pull's file is
    ignored)."""
    try:
        doc = json.loads(state_files.pull_progress(dashboard_url).read_text())
        pid = int(doc["pid"])
        os.kill(pid, 0)
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    models = doc.get("models")
    return {str(k): dict(v) for k, v in models.items()} if isinstance(models, dict) else {}
