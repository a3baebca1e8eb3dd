"""Fuzz: the default fleet with random bytes or YAML tokens inserted, deleted or replaced either validates or
fails with a SpecError whose problems are one line each — no other exception reaches the CLI or the daemon."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reconciler.desired.pipeline import desired_state
from reconciler.errors import SpecError
from reconciler.fleetfiles import estimate
from tests.fixtures.default_fleet import REPO, copy_default_fleet

TOKENS = [
    ":", ": ", "-", "- ", "[", "]", "{", "}", ",", "?", "? ", "|", ">", "#", "&a ", "*a", "<<: *a", "!!python/object ",
    "!!str ", "!!int ", "!!binary ", "!!set ", "!!omap ", "!local ", "! ", "\t", "'", '"', "\x00", "\x1b", "\n", "\r",
    "  ", "---\n", "...\n", "%YAML 1.1\n", "@", "`", "null", "~", "true", "no", "1e999", "-1", "0", "-0.0", ".nan",
    "99999999999999999999999", "9" * 5000, "2024-13-01", "2024-01-01", "{d: 2024-01-01}", "12:30:00", "0x1F", "0o17",
    '""', "''", "\\u0000", "\ufeff", "\u2028", "\xa0", "models", "engine", "gpus", "replicas", "source", "task",
    "defaults", "swap_group", "always_on", "idle_timeout", "15m", "-5m", "1TiB", "pkg://", "hf://", "file://", "/",
    "..",
]
T = TypeVar("T")
_PIECES = re.compile(r"\s+|\w+|[^\w\s]")


def edit(pieces: list[T], ops: list[tuple[int, int, T]]) -> list[T]:
    """Apply (where, what, token) edits: what 0 inserts TOKEN, 1 deletes, 2 replaces with TOKEN
    (tokens are YAML pieces, or bytes as ints)."""
    out = list(pieces)
    for where, what, token in ops:
        i = where % (len(out) + 1)
        if what == 0 or i == len(out):
            out.insert(i, token)
        elif what == 1:
            del out[i]
        else:
            out[i] = token
    return out


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    root = tmp_path_factory.mktemp("fuzz")
    copy_default_fleet(root)
    yield root, (root / "fleet.yaml").read_text()


def only_spec_errors(root: Path, data: bytes) -> None:
    (root / "fleet.yaml").write_bytes(data)
    try:
        desired_state(root)
    except SpecError as e:
        assert e.problems and all("\n" not in str(p) for p in e.problems), e


TOKEN_EDITS = st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 2), st.sampled_from(TOKENS)),
                       min_size=1, max_size=6)
FUZZ = settings(max_examples=150, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@FUZZ
@given(ops=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 2), st.integers(0, 255)), min_size=1, max_size=8))
def test_random_bytes_end_in_success_or_spec_error(fleet: tuple[Path, str], ops: list[tuple[int, int, int]]) -> None:
    root, text = fleet
    only_spec_errors(root, bytes(edit(list(text.encode()), ops)))


@FUZZ
@given(ops=TOKEN_EDITS)
def test_random_yaml_tokens_end_in_success_or_spec_error(fleet: tuple[Path, str],
                                                         ops: list[tuple[int, int, str]]) -> None:
    root, text = fleet
    only_spec_errors(root, "".join(edit(_PIECES.findall(text), ops)).encode())


@pytest.fixture(scope="module")
def gpu_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """The 3-GPU example (inventory, gpus, gpu_memory: most of placement) as a fleet; the Hub is never asked."""
    root = tmp_path_factory.mktemp("fuzz-gpu")
    text = (REPO / "fleet.d" / "gpu-box.yaml.example").read_text()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(estimate, "hub_bytes", lambda source: None)
        yield root, text


@FUZZ
@given(ops=TOKEN_EDITS)
def test_random_tokens_in_a_gpu_fleet_end_in_success_or_spec_error(gpu_fleet: tuple[Path, str],
                                                                   ops: list[tuple[int, int, str]]) -> None:
    root, text = gpu_fleet
    only_spec_errors(root, "".join(edit(_PIECES.findall(text), ops)).encode())
