"""`fleetctl pull [MODEL...]`: download hf:// models' files ahead of time, with progress.

Parses arguments and prints; the work is reconciler.hub.download's. On a terminal: a bar per file and
one for the model (tqdm); elsewhere plain lines; ``--json``: one JSON object per line.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import click

from reconciler.desired.pipeline import desired_state
from reconciler.errors import SpecError
from reconciler.hub import download

EXIT_OK, EXIT_ERROR, EXIT_NO_SPACE, EXIT_INTERRUPTED = 0, 1, 3, 130
JSON_EVERY_S = 1.0


@click.command("pull")
@click.argument("models", nargs=-1)
@click.option("-f", "--fleet", "path", default=".", show_default=True, type=click.Path(path_type=Path),
              help="The fleet folder (fleet.yaml + fleet.d/) or file.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per line (events, then a summary).")
def pull_cmd(models: tuple[str, ...], path: Path, as_json: bool) -> None:
    """Download the files of hf:// MODELS (default: every served hf:// model), and of their hf://
    LoRA adapters, into the cache the engines read, so starting them is never also a download.

    \b
    Checks the free disk space first (from the sizes the Hub lists) and downloads nothing when it
    is short. An interrupted pull continues where it stopped when run again. Uses HF_TOKEN (never
    printed) and HF_HOME / HF_HUB_CACHE, or the model's env in the fleet file when it sets them.
    `fleetctl apply` does the same for new and changed models before it touches Serve.

    \b
    Exit codes: 0 downloaded (or already were), 1 error (invalid files, unknown model, Hub error,
    a download that failed), 3 not enough disk space (nothing downloaded), 130 interrupted.
    """
    out = _Output(as_json)
    try:
        state = desired_state(path)
    except SpecError as e:
        out.fail(EXIT_ERROR, f"{e}\nthe fleet files are invalid; nothing was downloaded")
    placed = {m.name: m for m in state.placed.models}
    unknown = [n for n in models if n not in placed]
    if unknown:
        out.fail(EXIT_ERROR, f"no model named {', '.join(unknown)} in the fleet; "
                             f"its models: {', '.join(placed) or '(none)'}")
    chosen = [placed[n] for n in models] if models else list(placed.values())
    for m in chosen:
        if not download.hub_sources(m):
            out.note(m.name, f"{m.name}: {m.source} is not on the Hub; nothing to pull")
    # a model's hf:// LoRA adapters come with it, labelled model/adapter, in the model's cache (its env)
    wanted = [(label, source, m.env) for m in chosen for label, source in download.hub_sources(m)]
    if not wanted:
        out.summary(True, [], 0)
        return
    needs, errors, envs = [], [], {}
    for label, source, model_env in wanted:
        envs[label] = model_env
        try:
            needs.append(download.measure(label, source, model_env))
        except download.DownloadError as e:
            errors.append(str(e))
    if errors:
        out.fail(EXIT_ERROR, "\n".join(errors) + "\nnothing was downloaded")
    for mf in needs:
        out.model(mf)
    try:
        download.check_space(needs)
    except download.NoSpaceError as e:
        out.fail(EXIT_NO_SPACE, str(e), needed=e.needed, free=e.free, where=str(e.where))
    t0, fetched = time.monotonic(), 0
    try:
        with download.ProgressFile(state.placed.ray.dashboard_url, then=out.progress) as progress:
            for mf in needs:
                download.pull_interruptibly(mf, progress, envs[mf.model])
                fetched += mf.missing
    except download.DownloadError as e:
        out.fail(EXIT_ERROR, str(e))
    except KeyboardInterrupt:
        out.close_bars()
        out.fail(EXIT_INTERRUPTED, "interrupted; run the same `fleetctl pull` again to continue where it stopped")
    out.summary(True, [mf.model for mf in needs], fetched, time.monotonic() - t0)


class _Output:
    """Where progress goes: bars on a terminal, lines elsewhere, JSON lines with --json."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.tty = not as_json and sys.stderr.isatty()
        self.lines = download.LineReporter(lambda line: click.echo(line, err=True))
        self._bars: dict[str, Any] = {}
        self._last_json = 0.0

    def emit(self, obj: dict[str, Any]) -> None:
        click.echo(json.dumps(obj))

    def fail(self, code: int, message: str, **extra: Any) -> None:
        message = download.scrub(message)
        if self.as_json:
            self.emit({"event": "error", "ok": False, "exit_code": code, "error": message, **extra})
        else:
            click.echo(click.style("error: ", fg="red", bold=True) + message, err=True)
        sys.exit(code)

    def note(self, model: str, text: str) -> None:
        if self.as_json:
            self.emit({"event": "skip", "model": model, "message": text})
        else:
            click.echo(text, err=True)

    def model(self, mf: download.ModelFiles) -> None:
        if self.as_json:
            self.emit({"event": "model", "model": mf.model, "source": mf.source, "commit": mf.commit,
                       "cache_dir": str(mf.cache_dir), "files": len(mf.files), "total_bytes": mf.total,
                       "missing_bytes": mf.missing})
            return
        what = (f"{download.format_bytes(mf.missing)} to download" if mf.missing else "already downloaded")
        click.echo(f"{mf.model}: {mf.source} (commit {mf.commit[:12]}), {len(mf.files)} files, "
                   f"{download.format_bytes(mf.total)}; {what} into {mf.cache_dir}", err=True)

    def progress(self, p: download.Progress) -> None:
        if self.as_json:
            now = time.monotonic()
            if p.event != "bytes" or now - self._last_json >= JSON_EVERY_S:
                self._last_json = now
                self.emit({"event": p.event, "model": p.model, "done_bytes": p.done, "total_bytes": p.total,
                           "file": p.file, "file_done_bytes": p.file_done, "file_total_bytes": p.file_total,
                           "files_done": p.files_done, "files_total": p.files_total})
        elif self.tty:
            self._bar(p)
        else:
            self.lines(p)

    def _bar(self, p: download.Progress) -> None:
        from tqdm import tqdm

        tqdm.monitor_interval = 0  # no monitor thread: Ctrl-C must reach the main thread (download.ProgressFile)
        total = self._bars.get("total")
        if p.event == "model":
            self.close_bars()
            self._bars["total"] = tqdm(total=p.total, initial=p.done, desc=f"{p.model} total", unit="B",
                                       unit_scale=True, unit_divisor=1024, position=0, leave=True)
            return
        if total is not None:
            total.update(p.done - total.n)
        if p.event == "file":
            if (bar := self._bars.pop("file", None)) is not None:
                bar.close()
            self._bars["file"] = tqdm(total=p.file_total, initial=p.file_done, desc=p.file[-40:], unit="B",
                                      unit_scale=True, unit_divisor=1024, position=1, leave=False)
        elif (bar := self._bars.get("file")) is not None:
            bar.update(p.file_done - bar.n)
            if p.event == "file_done":
                self._bars.pop("file").close()
        if p.event == "model_done":
            self.close_bars()

    def close_bars(self) -> None:
        for key in ("file", "total"):
            if (bar := self._bars.pop(key, None)) is not None:
                bar.close()

    def summary(self, ok: bool, models: list[str], fetched: int, seconds: float = 0.0) -> None:
        if self.as_json:
            self.emit({"event": "summary", "ok": ok, "models": models, "downloaded_bytes": fetched,
                       "seconds": round(seconds, 3)})
            return
        if models:
            rate = f" ({download.format_bytes(fetched / seconds)}/s)" if fetched and seconds > 0 else ""
            click.echo(click.style("Pulled: ", fg="green", bold=True)
                       + f"{', '.join(models)}; {download.format_bytes(fetched)} downloaded in {seconds:.1f} s{rate}.")
