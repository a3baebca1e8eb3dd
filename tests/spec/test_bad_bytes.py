"""No input kills the reader: bad bytes, odd files and hostile YAML each end in a SpecError naming the file (and
the line where there is one), in bounded time and memory — never in another exception or a hang."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import time
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from reconciler.desired.pipeline import desired_state
from reconciler.errors import SpecError
from reconciler.fleetfiles import loader

REPO = Path(__file__).resolve().parents[2]
GOOD = "models:\n  chat:\n    source: hf://org/chat\n"
BILLION_LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n" for i in range(8)
) + "models:\n  chat: {source: hf://org/chat, engine: {x: *i}}\n"


def write(root: Path, name: str, content: str | bytes) -> Path:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


Make = Callable[[Path, pytest.MonkeyPatch], None]  # lays out a fleet in a folder


def extra(name: str, content: str | bytes) -> Make:
    """fleet.yaml is fine; fleet.d/NAME holds CONTENT."""
    def make(root: Path, _: pytest.MonkeyPatch) -> None:
        write(root, "fleet.yaml", GOOD)
        write(root, f"fleet.d/{name}", content)
    return make


def main_file(content: str | bytes) -> Make:
    def make(root: Path, _: pytest.MonkeyPatch) -> None:
        write(root, "fleet.yaml", content)
    return make


def nothing(root: Path, _: pytest.MonkeyPatch) -> None:
    """No fleet.yaml at all."""


def with_link(target: str) -> Make:
    def make(root: Path, _: pytest.MonkeyPatch) -> None:
        write(root, "fleet.yaml", GOOD)
        (root / "fleet.d").mkdir()
        (root / "fleet.d" / "x.yaml").symlink_to(target)
    return make


def with_folder(name: str) -> Make:
    def make(root: Path, _: pytest.MonkeyPatch) -> None:
        if name != "fleet.yaml":
            write(root, "fleet.yaml", GOOD)
        (root / name).mkdir(parents=True)
    return make


def with_fifo(root: Path, _: pytest.MonkeyPatch) -> None:
    write(root, "fleet.yaml", GOOD)
    (root / "fleet.d").mkdir()
    os.mkfifo(root / "fleet.d" / "x.yaml")  # nobody ever writes: opening it for reading would block


def sparse_50mb(root: Path, _: pytest.MonkeyPatch) -> None:
    write(root, "fleet.yaml", GOOD)
    with open(write(root, "fleet.d/big.yaml", b""), "wb") as f:
        f.truncate(50 * 1000 * 1000)  # 50 MB of NULs on disk (sparse): reading it would show in the memory peak


def unreadable(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """chmod 000 does not stop root, so the open itself fails as it would for any other user."""
    path = write(root, "fleet.d/secret.yaml", GOOD.replace("chat", "other"))
    write(root, "fleet.yaml", GOOD)
    real_open = os.open

    def open_(file: str | os.PathLike[str], flags: int, *args: int) -> int:
        if Path(file) == path:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
        return real_open(file, flags, *args)
    monkeypatch.setattr(loader.os, "open", open_)


def unlistable_fleet_d(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(root, "fleet.yaml", GOOD)
    (root / "fleet.d").mkdir()

    def scandir(path: object) -> None:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
    monkeypatch.setattr(loader.os, "scandir", scandir)


def deleted_after_listing(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(root, "fleet.yaml", GOOD)
    path = write(root, "fleet.d/gone.yaml", GOOD.replace("chat", "other"))
    real = loader.fleet_files

    def list_then_delete(*args: object) -> object:
        listed = real(*args)  # type: ignore[arg-type]
        path.unlink()
        return listed
    monkeypatch.setattr(loader, "fleet_files", list_then_delete)


def recursion_while_merging(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The composer bounds nesting; should anything below it still recurse too deep, that is a Problem too."""
    write(root, "fleet.yaml", GOOD)

    def too_deep(*_: object) -> None:
        raise RecursionError("maximum recursion depth exceeded")
    monkeypatch.setattr(loader, "record_positions", too_deep)


def too_many_values(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The budget is 20,000 values (a 1 MiB file of them takes seconds to parse); 50 here keeps the test fast."""
    monkeypatch.setattr(loader, "MAX_NODES", 50)
    write(root, "fleet.yaml", GOOD + "    engine:\n      x:\n" + "".join(f"        - {i}\n" for i in range(60)))


def thousand_files(root: Path, _: pytest.MonkeyPatch) -> None:
    write(root, "fleet.yaml", "defaults:\n  idle_timeout: 15m\n")
    for i in range(1000):
        write(root, f"fleet.d/{i:04d}.yaml", f"models:\n  m{i:04d}:\n    source: hf://org/m{i:04d}\n")


def emacs_lock_beside(root: Path, _: pytest.MonkeyPatch) -> None:
    """An editor's lock file (a dangling link named .#x.yaml) sits beside a file being edited: ignored."""
    write(root, "fleet.yaml", GOOD)
    (root / "fleet.d").mkdir()
    (root / "fleet.d" / ".#x.yaml").symlink_to("root@host.1234:1700000000")


@dataclass(frozen=True)
class Bad:
    id: str
    make: Make
    file: str | None  # the file every problem names ("": none, the fleet has no file); None: the fleet is valid
    line: int | None = None  # the first problem's line, where the input has one
    says: str = ""  # words the first problem's message must contain
    column: int | None = None


CASES = [
    Bad("escape-code", main_file(GOOD + "# pasted \x1b[0m junk\n"), "fleet.yaml", 4, "U+001B (ESC)", column=10),
    Bad("bell", extra("a.yaml", "models:\n  x:\n    source: hf://o/x\x07\n"), "fleet.d/a.yaml", 3, "U+0007 (BEL)"),
    Bad("c1-control", main_file(GOOD + "# \u0085 ok but \u009b not\n"), "fleet.yaml", 4, "U+009B"),
    Bad("nul-byte", main_file(GOOD + "x: a\x00b\n"), "fleet.yaml", 4, "NUL byte", column=5),
    Bad("invalid-utf8", main_file(GOOD.encode() + b"# caf\xe9\n"), "fleet.yaml", 4, "byte 0xe9 (byte offset 47)",
        column=6),
    Bad("latin1-in-value", extra("l.yaml", b"models:\n  x:\n    source: hf://o/\xff\n"), "fleet.d/l.yaml", 3,
        "save the file as UTF-8"),
    Bad("utf16-bom", main_file("\ufeff".encode("utf-16-le") + GOOD.encode("utf-16-le")), "fleet.yaml", 1,
        "saved as UTF-16"),
    Bad("utf16-be-bom", main_file(GOOD.encode("utf-16")[:2] + GOOD.encode("utf-16-be")), "fleet.yaml", 1, "UTF-16"),
    Bad("utf32-bom", main_file(GOOD.encode("utf-32")), "fleet.yaml", 1, "saved as UTF-32"),
    Bad("utf16-no-bom", main_file(GOOD.encode("utf-16-le")), "fleet.yaml", 1, "saved as UTF-16, save it as UTF-8"),
    Bad("utf8-bom-is-fine", main_file(b"\xef\xbb\xbf" + GOOD.encode()), None),
    Bad("empty", main_file(""), "fleet.yaml", 1, "file is empty"),
    Bad("folder-in-fleet.d", with_folder("fleet.d/x.yaml"), "fleet.d/x.yaml", 1, "is a folder"),
    Bad("fleet.yaml-is-a-folder", with_folder("fleet.yaml"), "fleet.yaml", 1, "is a folder"),
    Bad("fleet.yaml-missing", nothing, "", None, "fleet.yaml not found"),
    Bad("unreadable", unreadable, "fleet.d/secret.yaml", 1, "permission denied"),
    Bad("fleet.d-unlistable", unlistable_fleet_d, "", None, "fleet.d/ cannot be listed: permission denied"),
    Bad("dangling-link", with_link("nowhere.yaml"), "fleet.d/x.yaml", 1, "link to nowhere.yaml, which does not exist"),
    Bad("link-loop", with_link("x.yaml"), "fleet.d/x.yaml", 1, "symbolic link loop"),
    Bad("link-to-dev-zero", with_link("/dev/zero"), "fleet.d/x.yaml", 1, "is a device"),
    Bad("fifo", with_fifo, "fleet.d/x.yaml", 1, "is a FIFO"),
    Bad("deleted-after-listing", deleted_after_listing, "fleet.d/gone.yaml", 1, "disappeared"),
    Bad("50-MB", sparse_50mb, "fleet.d/big.yaml", 1, "file is 50.0 MB"),
    Bad("billion-laughs", main_file(BILLION_LAUGHS), "fleet.yaml", 1, "anchor &a: anchors (&) and aliases (*)"),
    Bad("alias-only", main_file("models:\n  chat: *nothing\n"), "fleet.yaml", 2, "alias *nothing"),
    Bad("merge-key", main_file("base: &b {source: hf://o/x}\nmodels:\n  chat: {<<: *b}\n"), "fleet.yaml", 1,
        "anchor &b"),
    Bad("deep-flow", main_file("models: " + "[" * 100_000), "fleet.yaml", 1, "nested more than 40 levels",
        column=48),
    Bad("deep-block", main_file("".join("  " * i + f"k{i}:\n" for i in range(200))), "fleet.yaml", 40,
        "nested more than 40 levels"),
    Bad("too-many-values", too_many_values, "fleet.yaml", 45, "more than 50 values in one file"),
    Bad("recursion-while-merging", recursion_while_merging, "fleet.yaml", 1, "nested more than"),
    Bad("python-tag", main_file(GOOD + "x: !!python/object/apply:os.system [ls]\n"), "fleet.yaml", 4,
        "tag !!python/object/apply:os.system is not allowed"),
    Bad("local-tag", main_file(GOOD + "x: !env HOME\n"), "fleet.yaml", 4, "tag !env"),
    Bad("bad-int", main_file(GOOD + "x: !!int twelve\n"), "fleet.yaml", 4, "cannot read 'twelve' as int"),
    Bad("bad-bool", main_file(GOOD + "x: !!bool maybe\n"), "fleet.yaml", 4, "cannot read 'maybe' as bool"),
    Bad("bad-date", main_file(GOOD + "x: 2024-13-01\n"), "fleet.yaml", 4, "month must be in 1..12"),
    Bad("huge-int", main_file(GOOD + "x: " + "9" * 5000 + "\n"), "fleet.yaml", 4, "Exceeds the limit"),
    Bad("two-documents", main_file(GOOD + "---\n" + GOOD), "fleet.yaml", 4, "expected a single document"),
    Bad("thousand-files", thousand_files, None),
    Bad("editor-lock-file-ignored", emacs_lock_beside, None),
]


@pytest.fixture
def deadline() -> Iterator[None]:
    """A hang (a FIFO opened for reading, /dev/zero read to the end) fails the test instead of stalling it."""
    def expired(*_: object) -> None:
        raise TimeoutError("reading the fleet took over 20 s")
    old = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, 20)
    yield
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_spec_error_naming_the_file(case: Bad, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      deadline: None) -> None:
    case.make(tmp_path, monkeypatch)
    if case.file is None:
        desired_state(tmp_path)
        return
    with pytest.raises(SpecError) as raised:
        desired_state(tmp_path)
    first, *_ = problems = raised.value.problems
    if not case.file:
        assert [first.location] == [p.location for p in problems] == [None]
    else:
        assert {p.location.file if p.location else None for p in problems} == {case.file}, problems
        assert first.location and first.location.line == case.line, first
        assert case.column is None or first.location.column == case.column, first
    assert case.says in first.message, first
    assert all("\n" not in str(p) for p in problems)


def test_a_file_run_as_root_or_not_chmod_000_is_a_clean_error(tmp_path: Path) -> None:
    write(tmp_path, "fleet.yaml", GOOD)
    secret = write(tmp_path, "fleet.d/secret.yaml", GOOD.replace("chat", "other"))
    secret.chmod(0)
    if os.geteuid() == 0:
        pytest.skip("root reads a chmod-000 file; the 'unreadable' case covers the error by failing the open")
    with pytest.raises(SpecError, match="fleet.d/secret.yaml:1:1: cannot be read: permission denied"):
        desired_state(tmp_path)


@pytest.mark.parametrize("make, limit_s", [(main_file(BILLION_LAUGHS), 1.0), (sparse_50mb, 1.0)],
                         ids=["billion-laughs", "50-MB"])
def test_hostile_input_costs_little_time_and_memory(make: Make,
                                                     limit_s: float, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    make(tmp_path, monkeypatch)
    began = time.perf_counter()
    with pytest.raises(SpecError):
        loader.read_fleet(tmp_path)
    assert time.perf_counter() - began < limit_s
    tracemalloc.start()
    try:
        with pytest.raises(SpecError):
            loader.read_fleet(tmp_path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 * 1024 * 1024  # bytes: the 50 MB file is never read; the bomb is never expanded


@pytest.mark.parametrize("make, line", [(main_file(GOOD + "# pasted \x1b[0m junk\n"), "fleet.yaml:4:10: control"),
                                        (main_file(GOOD + "x: a\x00b\n"), "fleet.yaml:4:5: NUL byte")],
                         ids=["escape-code", "nul-byte"])
def test_fleetctl_validate_prints_one_line_and_exits_1(make: Make, line: str,
                                                        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make(tmp_path, monkeypatch)
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # this checkout's reconciler, whatever the venv installed
    result = subprocess.run(["fleetctl", "validate", str(tmp_path)], capture_output=True, text=True, timeout=60,
                            env=env)
    assert result.returncode == 1, result.stderr
    errors = [x for x in result.stderr.splitlines() if x.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {line}"), result.stderr
    assert "Traceback" not in result.stdout + result.stderr
