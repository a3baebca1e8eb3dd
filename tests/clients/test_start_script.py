"""scripts/start.sh as a stock Debian/Ubuntu user runs it: the system python3 first on PATH.

The client fleet (conftest.py) was brought up by exactly that run; here we check what it did:
it worked in a virtual environment (never the system Python's site-packages), installed nothing
the second time (.ci/run's install was the first), and serves the default fleet. Then a second
start.sh on the running fleet changes nothing.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import openai
import pytest

from .conftest import CHAT, EMBED, REPO, ClientFleet

pytestmark = pytest.mark.serve


def test_start_sh_used_a_venv_and_serves_the_default_fleet(client_fleet: ClientFleet) -> None:
    start = client_fleet.start
    assert f"OpenAI endpoint: {client_fleet.endpoint}/v1" in start.stdout
    if sys.prefix != sys.base_prefix:  # this run is in a venv: start.sh used it (not /usr/bin/python3's packages)
        assert "vLLM Fleet is installed" in start.stderr, start.stderr[-3000:]  # and its install step was a check
        assert f"{Path(sys.prefix) / 'bin' / 'python'})" in start.stderr
    client = openai.OpenAI(base_url=client_fleet.endpoint + "/v1", api_key="unused", timeout=300, max_retries=0)
    chat = client.chat.completions.create(model=CHAT, max_tokens=20, temperature=0,
                                          messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in (chat.choices[0].message.content or "")
    assert [len(d.embedding) for d in client.embeddings.create(model=EMBED, input=["a"]).data] == [384]


def test_second_start_changes_nothing(client_fleet: ClientFleet) -> None:
    again = subprocess.run(["bash", str(REPO / "scripts" / "start.sh"), str(client_fleet.root)], cwd=client_fleet.root,
                           env=client_fleet.env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "vLLM Fleet is installed" in again.stderr or "FLEET_NO_INSTALL" in again.stderr
    out = again.stdout + again.stderr
    assert "using it" in out and "No changes" in out, out[-3000:]
