"""daemon.follow: a fleet checkout that follows its remote, fast-forward only. Real git, local repos; no Ray."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from reconciler.desired.pipeline import desired_state
from reconciler.loop.follow import follow_once


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(cwd), *args], check=True, capture_output=True, text=True,
                          env={"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.org", "GIT_COMMITTER_NAME": "t",
                               "GIT_COMMITTER_EMAIL": "t@example.org", "HOME": str(cwd),
                               "PATH": "/usr/local/bin:/usr/bin:/bin"}).stdout.strip()


def commit(repo: Path, text: str, message: str) -> str:
    (repo / "fleet.yaml").write_text(text)
    git(repo, "add", "fleet.yaml")
    git(repo, "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "HEAD")


FLEET = "models:\n  tiny:\n    source: {src}\n    idle_timeout: {idle}\n"


@pytest.fixture()
def repos(tmp_path: Path) -> tuple[Path, Path]:
    """(upstream, the box's checkout), one commit in common."""
    upstream = tmp_path / "upstream"
    upstream.mkdir()
    git(upstream, "init", "-q", "-b", "main")
    commit(upstream, FLEET.format(src=tmp_path / "model", idle="15m"), "first")
    box = tmp_path / "box"
    subprocess.run(["git", "clone", "-q", str(upstream), str(box)], check=True)
    return upstream, box


def test_a_commit_upstream_is_fast_forwarded_and_then_up_to_date(repos: tuple[Path, Path], tmp_path: Path) -> None:
    upstream, box = repos
    new = commit(upstream, FLEET.format(src=tmp_path / "model", idle="30m"), "longer idle")
    got = follow_once(box, "origin", "main")
    assert got.ok and got.revision == new and "fast-forwarded" in got.message, got
    assert "idle_timeout: 30m" in (box / "fleet.yaml").read_text()
    assert desired_state(box).placed.models[0].idle_timeout_s == 1800  # what the daemon will apply
    again = follow_once(box, "origin", "main")
    assert again.ok and "up to date" in again.message


def test_local_changes_and_a_diverged_branch_are_refused_and_left_alone(repos: tuple[Path, Path],
                                                                         tmp_path: Path) -> None:
    upstream, box = repos
    commit(upstream, FLEET.format(src=tmp_path / "model", idle="30m"), "upstream edit")
    edited = FLEET.format(src=tmp_path / "model", idle="45m")
    (box / "fleet.yaml").write_text(edited)  # an edit on the box, not committed
    got = follow_once(box, "origin", "main")
    assert not got.ok and "local changes" in got.message
    assert (box / "fleet.yaml").read_text() == edited
    git(box, "-c", "user.name=t", "-c", "user.email=t@example.org", "commit", "-qam", "on the box")
    ours = git(box, "rev-parse", "HEAD")
    got = follow_once(box, "origin", "main")
    assert not got.ok and "diverged" in got.message and got.revision == ours
    assert git(box, "rev-parse", "HEAD") == ours


def test_a_remote_that_cannot_be_fetched_is_reported(repos: tuple[Path, Path]) -> None:
    _, box = repos
    got = follow_once(box, "nowhere", "main")
    assert not got.ok and "git fetch" in got.message
