"""`fleetctl daemon`: reconcile on every edit of the fleet files and on a timer, keep a record of
what happened, and serve it read-only (reconciler.loop.status_api).

The loop is one switch over `reconcile()`'s Outcome, as controller-runtime's handler is: ok →
requeue after the resync interval; transient (Serve unreachable, lock held) → retry with backoff;
terminal (bad files, no capacity, a model that failed) → wait for the next edit or resync. It is
level-triggered: each pass reads the files and the live Serve afresh, so a killed daemon,
restarted, simply carries on, and drift (an app changed or deleted by hand, a restarted Ray head)
is healed on the next pass. An invalid edit never reaches Serve: the daemon keeps reconciling
toward the last good files and shows the error (file:line) until the files are fixed.

Only the loop thread writes `DaemonState`; the API reads immutable snapshots of it.
"""

from __future__ import annotations

import json
import logging
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx

from reconciler import state_files
from reconciler.change import last_good
from reconciler.change.rollout import Rollouts
from reconciler.desired.pipeline import DesiredState, desired_state
from reconciler.errors import SpecError
from reconciler.hub import download
from reconciler.live import cluster, endpoint_stats, engine_log, local_head
from reconciler.live import serve_state as live_mod
from reconciler.loop import follow as follow_mod
from reconciler.loop import pulse as pulse_mod
from reconciler.loop import status as status_mod
from reconciler.loop.reconcile import Failures, Outcome, Result, plan_for, reconcile
from reconciler.loop.watch import DEBOUNCE_MS, watch

logger = logging.getLogger("fleetctl.daemon")
BACKOFF_MAX_S = 60.0


class Stopping(Exception):
    """Raised inside a pass (through the progress callback) when the daemon is asked to stop."""


@dataclass(frozen=True)
class DaemonState:
    """What the API shows. Replaced wholesale by the loop; never mutated in place."""

    path: str
    started_at: float
    pid: int
    reconciles: int = 0
    applies: int = 0
    drift_corrections: int = 0
    last: Outcome | None = None  # the last pass
    last_change: Outcome | None = None  # the last pass that changed (or tried to change) Serve
    spec_error: tuple[dict[str, Any], ...] = ()  # problems of the current files; () when valid
    revision: dict[str, Any] | None = None
    status: dict[str, Any] | None = None  # the status document of the last pass
    status_error: str = ""
    holding: dict[str, Any] | None = None  # the kept last good files, while the files are invalid
    follow: dict[str, Any] | None = None  # the last look at the followed git remote (daemon.follow)
    progress: str = ""  # the last progress line of a running pass
    triggers: dict[str, int] = field(default_factory=dict)  # why passes ran: edit / resync / retry / start

    def section(self) -> dict[str, Any]:
        """The daemon's part of GET /status."""
        return {
            "path": self.path, "pid": self.pid, "started_at": self.started_at,
            "reconciles": self.reconciles, "applies": self.applies, "drift_corrections": self.drift_corrections,
            "last_reconcile": self.last.as_dict() if self.last else None,
            "last_change": self.last_change.as_dict() if self.last_change else None,
            "spec_error": list(self.spec_error), "revision": self.revision, "progress": self.progress,
            "holding": self.holding, "follow": self.follow,
            "triggers": dict(self.triggers),
        }


def git_revision(root: Path) -> dict[str, Any] | None:
    """The fleet folder's git commit, and whether its fleet files differ from it; None outside git."""
    def git(*args: str) -> str | None:
        try:
            r = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return r.stdout.strip() if r.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return None
    dirty = git("status", "--porcelain", "--", "fleet.yaml", "fleet.d")
    return {"commit": commit, "dirty": bool(dirty)}


class Daemon:
    def __init__(self, path: Path, *, resync_s: float | None = None, debounce_ms: int = DEBOUNCE_MS,
                 on_pass: Callable[[DaemonState], None] | None = None) -> None:
        import os

        self.path = path.resolve()
        self.root = self.path if self.path.is_dir() else self.path.parent
        self._resync_override = resync_s
        self._debounce_ms = debounce_ms
        self._on_pass = on_pass
        self.stop_event = threading.Event()
        self._kick = threading.Event()
        self._kick_reason = "start"
        self._last_good: DesiredState | None = None
        self._failures = Failures()  # configs that failed to start, or that Serve did not keep
        self._rollouts = Rollouts()  # starts in progress, followed across passes (never waited on)
        self._follower: threading.Thread | None = None
        self._json_cache: tuple[DaemonState, int, bytes] | None = None
        # the endpoint's samples (reconciler.loop.pulse), taken by their own thread between passes
        self._samples: deque[endpoint_stats.Sample] = deque(maxlen=pulse_mod.KEPT)
        self._endpoint_answered = False
        self._lock = threading.Lock()
        self._state = DaemonState(str(self.path), time.time(), os.getpid())

    # ---- read side (any thread) ----

    def snapshot(self) -> DaemonState:
        with self._lock:
            return self._state

    def _set(self, **changes: Any) -> None:
        with self._lock:
            self._state = replace(self._state, **changes)

    # ---- the loop (one thread) ----

    def resync_s(self) -> float:
        if self._resync_override is not None:
            return self._resync_override
        return self._last_good.placed.daemon.resync if self._last_good else 30.0

    def kick(self, reason: str) -> None:
        self._kick_reason = reason
        self._kick.set()

    def run(self) -> None:
        """Reconcile until stop() — on start, on each edit, each resync interval, and on retries."""
        watch(self.root, lambda _paths: self.kick("edit"), self.stop_event, self._debounce_ms)
        threading.Thread(target=self._take_pulse, name="pulse", daemon=True).start()
        reason, backoff = "start", 1.0
        while not self.stop_event.is_set():
            try:
                outcome = self.run_pass(reason)
            except Exception as e:  # the one outer guard: nothing a pass meets may stop the loop
                logger.exception("the pass failed unexpectedly; the next one runs in %.0f s", BACKOFF_MAX_S / 4)
                outcome = Outcome(Result.UNREACHABLE, f"the pass failed unexpectedly: {type(e).__name__}: {e}",
                                  started_at=time.time(), requeue_after=BACKOFF_MAX_S / 4)
                self._record(reason, outcome, (), revision=git_revision(self.root))
            if outcome is None:  # stopping
                break
            self._start_following()
            if outcome.result.transient:
                wait = min(backoff * (outcome.requeue_after or 1.0), BACKOFF_MAX_S)
                backoff = min(backoff * 2, BACKOFF_MAX_S)
                reason_if_timeout = "retry"
            elif outcome.requeue_after is not None:  # starts in progress: look again soon, never wait on them
                wait, backoff, reason_if_timeout = min(outcome.requeue_after, self.resync_s()), 1.0, "progress"
            else:
                wait, backoff, reason_if_timeout = self.resync_s(), 1.0, "resync"
            kicked = self._kick.wait(wait)
            self._kick.clear()
            reason = self._kick_reason if kicked else reason_if_timeout

    def _take_pulse(self) -> None:
        """Read the endpoint every PULSE_S (the page's rates, TTFT, in flight, events); never a pass's work."""
        while not self.stop_event.wait(pulse_mod.PULSE_S):
            openai = self._last_good.placed.openai if self._last_good else None
            sample = endpoint_stats.read_endpoint(openai) if openai is not None else None
            with self._lock:
                if sample is not None:
                    self._samples.append(sample)
                self._endpoint_answered = sample is not None

    def pulse(self) -> dict[str, Any]:
        """GET /pulse: per model motion and state, the last lifecycle events (reconciler.loop.pulse)."""
        with self._lock:
            samples, answered = list(self._samples), self._endpoint_answered
        return {**pulse_mod.motion(samples), "endpoint_answered": answered}

    def engine_log(self, model: str, lines: int = 200) -> str | None:
        """The tail of the model's newest engine replica's vLLM log; None when the model has no engine."""
        s = self.snapshot()
        live = s.last.live if s.last else None
        app = live.apps.get(model) if live else None
        if app is None or self._last_good is None:
            return None
        with httpx.Client(base_url=self._last_good.placed.ray.dashboard_url) as client:
            return engine_log.Reader(client).tail(model, app, lines)

    def _start_following(self) -> None:
        """Follow the git remote the files name (daemon.follow), in a thread of its own; once."""
        settings = self._last_good.placed.daemon.follow if self._last_good else None
        if settings is None or self._follower is not None:
            return
        logger.info("following %s/%s every %.0f s", settings.remote, settings.branch, settings.every)
        self._follower = follow_mod.run(self.root, settings.remote, settings.branch, settings.every,
                                        self.stop_event, self._followed)

    def _followed(self, result: follow_mod.Followed) -> None:
        if not result.ok or "fast-forwarded" in result.message:
            (logger.info if result.ok else logger.warning)("git: %s", result.message)
        self._set(follow=result.as_dict())

    def stop(self) -> None:
        self.stop_event.set()
        self._kick.set()

    def _report(self, line: str) -> None:
        if self.stop_event.is_set():
            raise Stopping()
        logger.info("%s", line)
        self._set(progress=line)

    def run_pass(self, reason: str) -> Outcome | None:
        """One reconcile pass, recorded. None when the daemon was asked to stop mid-pass."""
        spec_error: tuple[dict[str, Any], ...] = ()
        holding: dict[str, Any] | None = None
        revision = git_revision(self.root)  # once a pass: kept with a copy, and shown
        try:
            desired = desired_state(self.path)
            self._last_good = desired
            if last_good.save(self.root, desired.loaded.files, revision):
                logger.info("kept a copy of the valid fleet files (%s)", ", ".join(desired.loaded.files))
        except SpecError as e:
            spec_error = tuple(p.as_dict() for p in e.problems)
            desired, holding = self._fallback()
            logger.error("the fleet files are invalid; the live fleet keeps %s:\n%s",
                         holding["describe"] if holding else "what it has (no valid version seen yet)", e)
        try:
            if desired is None:
                outcome = Outcome(Result.SPEC_ERROR, "the fleet files are invalid and no valid version was seen "
                                  "yet: nothing was changed", started_at=time.time())
            else:
                outcome = reconcile(self.path, desired=desired, report=self._report, failures=self._failures,
                                    lock_wait_s=1.0, lock_command="daemon", wait=False, rollouts=self._rollouts)
        except Stopping:
            return None
        self._record(reason, outcome, spec_error, holding, revision)
        if outcome.result is Result.UNREACHABLE and desired is not None:
            self._restart_dead_head(desired.placed.ray.dashboard_url)
        return outcome

    def _restart_dead_head(self, dashboard_url: str) -> None:
        """Ray unreachable: if it is the head `fleetctl up` started and it died, start it again (as
        `up` would); the next pass puts the fleet back. A Ray that up did not start is only waited for."""
        rec = local_head.load(dashboard_url)
        if rec is None or not local_head.is_dead(rec):
            return
        try:
            local_head.restart(rec, self._report)
        except cluster.HeadError as e:
            logger.error("the Ray head did not start again: %s", e)
        self.kick("head restarted")

    def _fallback(self) -> tuple[DesiredState | None, dict[str, Any] | None]:
        """What to reconcile toward while the files are invalid: the last good version this daemon
        saw, else the copy kept on disk by an earlier run (a daemon started on broken files)."""
        kept = last_good.desired(self.root)
        if self._last_good is None and kept is not None:
            self._last_good = kept[0]
        if self._last_good is None:
            return None, None
        if kept is not None:
            return self._last_good, {**kept[1].as_dict(), "describe": kept[1].describe()}
        return self._last_good, {"files": list(self._last_good.loaded.files), "describe": "the last valid files"}

    def _record(self, reason: str, outcome: Outcome, spec_error: tuple[dict[str, Any], ...],
                holding: dict[str, Any] | None = None, revision: dict[str, Any] | None = None) -> None:
        s = self.snapshot()
        changed = outcome.result in (Result.APPLIED, Result.FAILED)
        drift = outcome.result is Result.APPLIED and reason not in ("edit", "start")
        if outcome.result is not Result.SYNCED or spec_error:
            logger.info("pass (%s): %s %s", reason, outcome.result.value, outcome.message.splitlines()[0]
                        if outcome.message else "")
        doc, err = self._status_doc(outcome)
        self._set(
            reconciles=s.reconciles + 1,
            applies=s.applies + (1 if changed else 0),
            drift_corrections=s.drift_corrections + (1 if drift else 0),
            last=outcome, last_change=outcome if changed else s.last_change,
            spec_error=spec_error, revision=revision, status=doc, status_error=err, holding=holding,
            progress="", triggers={**s.triggers, reason: s.triggers.get(reason, 0) + 1},
        )
        if self._on_pass:
            self._on_pass(self.snapshot())

    def _status_doc(self, outcome: Outcome) -> tuple[dict[str, Any] | None, str]:
        desired = outcome.desired or self._last_good
        if desired is None:
            return None, outcome.message
        if outcome.result is Result.SYNCED and outcome.live is not None and outcome.plan is not None:
            live, plan = outcome.live, outcome.plan  # just read and planned by this pass: no second GET
        else:  # after an apply or a failure, what the pass saw has moved on
            try:
                live = live_mod.read_live_state(desired.placed.ray.dashboard_url)
            except live_mod.LiveStateError as e:
                return None, str(e)
            plan = plan_for(desired, live)
        runtime = live_mod.read_model_states(desired.placed.openai)
        doc = status_mod.document(plan, live, desired.placed, runtime=runtime)
        return status_mod.with_starts(doc, [v.as_dict() for v in outcome.rollouts]), ""

    def status_document(self) -> dict[str, Any]:
        """GET /status: the status document of the last pass plus the daemon's own section."""
        s = self.snapshot()
        doc = dict(s.status) if s.status else {
            "format_version": status_mod.FORMAT_VERSION, "serve_running": False, "in_sync": False,
            "health": "Unknown", "pending_changes": [], "models": [], "error": s.status_error}
        doc["daemon"] = s.section()
        # the same shape as `fleetctl status --json`: the files' errors, and what the fleet holds to
        doc["file_errors"] = list(s.spec_error)
        doc["desired_from"] = (f"the last good files: {s.holding['describe']}" if s.holding else
                               "the fleet files" if not s.spec_error else "no valid version of the files known")
        if self._last_good is not None:  # a running pull's progress, read now (a pass may be busy downloading)
            rows = [dict(r) for r in doc.get("models") or []]
            doc |= status_mod.with_downloads(rows, download.read_progress(self._last_good.placed.ray.dashboard_url))
            doc["models"] = rows
        return doc

    def status_json(self) -> bytes:
        """status_document() as JSON, serialised once per recorded state and download progress
        (the API's hot path)."""
        s = self.snapshot()
        stamp = self._progress_stamp()
        cached = self._json_cache
        if cached is None or cached[0] is not s or cached[1] != stamp:
            cached = (s, stamp, json.dumps(self.status_document()).encode())
            self._json_cache = cached
        return cached[2]

    def _progress_stamp(self) -> int:
        if self._last_good is None:
            return 0
        try:
            return state_files.pull_progress(self._last_good.placed.ray.dashboard_url).stat().st_mtime_ns
        except OSError:
            return 0

    def placed(self) -> Any:
        return self._last_good.placed if self._last_good else None
