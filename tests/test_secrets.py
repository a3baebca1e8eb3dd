"""Secrets are never shown: a rejected key is described, never echoed; env values are fingerprints in
every output (plan text and JSON, status), while the config apply PUTs keeps them. No Ray."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from reconciler.change import render
from reconciler.change.plan import make_plan, plan_from_dict, plan_to_dict
from reconciler.cli.fleetctl import main
from reconciler.desired.pipeline import desired_state
from reconciler.errors import SpecError
from reconciler.fleetfiles.redact import fingerprint, redact_at, redact_config, scrub
from reconciler.fleetfiles.validate import load_fleet
from reconciler.live.serve_state import LiveState
from reconciler.loop import status as status_mod
from tests.spec.test_bad_fleets import write_fleet
from tests.test_plan_render import live_of

BASE = "models:\n  chat:\n    source: hf://org/chat\n"
SHORT_KEY = "abc-1234567"  # 11 characters, not a variable's name
KEY = "sk-abcdef123456"
NO_LIVE = LiveState(apps={}, globals={}, serve_running=True)


def validate_output(tmp_path: Path, fleet: str) -> str:
    write_fleet(tmp_path, {"fleet.yaml": fleet})
    text = CliRunner().invoke(main, ["validate", str(tmp_path)]).output
    return text + CliRunner().invoke(main, ["validate", "--json", str(tmp_path)]).output


@pytest.mark.parametrize(("fleet", "secret", "field"), [
    (BASE + f"openai:\n  api_keys: [{SHORT_KEY}]\n", SHORT_KEY, "openai.api_keys[0]"),
    (BASE + "openai:\n  api_keys: [fleet_key]\n", "fleet_key", "openai.api_keys[0]"),
    (BASE + f"daemon:\n  token_env: {SHORT_KEY}\n", SHORT_KEY, "daemon.token_env"),
    (BASE + "    env:\n      OPENAI_KEY: 1234567890123\n", "1234567890123", "models.chat.env.OPENAI_KEY"),
    (BASE + "    env:\n      HF_TOKEN: hf_abcdefabcdef\n", "hf_abcdefabcdef", "models.chat.env"),
])
def test_a_rejected_secret_is_named_by_field_never_echoed(tmp_path: Path, fleet: str, secret: str,
                                                          field: str) -> None:
    write_fleet(tmp_path, {"fleet.yaml": fleet})
    with pytest.raises(SpecError) as e:
        load_fleet(tmp_path)
    [problem] = e.value.problems
    assert problem.field == field
    assert secret not in str(problem) and secret not in json.dumps(problem.as_dict())
    assert secret not in validate_output(tmp_path, fleet)


def test_a_short_inline_key_says_its_length_and_what_to_do(tmp_path: Path) -> None:
    write_fleet(tmp_path, {"fleet.yaml": BASE + f"openai:\n  api_keys: [{SHORT_KEY}]\n"})
    with pytest.raises(SpecError) as e:
        load_fleet(tmp_path)
    assert str(e.value.problems[0]) == (
        "fleet.yaml:5:14: openai.api_keys[0]: this looks like an inline secret (11 characters); put the key in "
        "an environment variable and name the variable here, e.g. api_keys: [FLEET_API_KEY]")


def test_other_fields_still_echo_what_they_got(tmp_path: Path) -> None:
    assert "(got 80000)" in validate_output(tmp_path, BASE + "openai:\n  port: 80000\n")


def env_fleet(tmp_path: Path, value: str) -> Path:
    return write_fleet(tmp_path, {"fleet.yaml": BASE + f"    env:\n      OPENAI_KEY: {value}\n"
                                  "      HF_HOME: \"${HF_HOME}\"\n"})


def test_plan_text_and_json_show_env_values_as_fingerprints(tmp_path: Path) -> None:
    desired = desired_state(env_fleet(tmp_path, KEY)).config
    plan = make_plan(desired, NO_LIVE)
    text, data = render.format_text(plan), render.format_json(plan)
    assert KEY not in text and KEY not in data
    assert fingerprint(KEY) in data and fingerprint(KEY).startswith("sha256:") and len(fingerprint(KEY)) == 15
    assert '"HF_HOME": "${HF_HOME}"' in data  # a reference is not a secret
    # what apply PUTs keeps the value
    [app] = [a for a in plan.put_config["applications"] if a["name"] == "chat"]
    assert app["args"]["env"]["OPENAI_KEY"] == KEY


def test_a_changed_env_value_shows_as_a_changed_fingerprint(tmp_path: Path) -> None:
    live = live_of(desired_state(env_fleet(tmp_path / "old", KEY)).config)
    new = "sk-abcdef999999"
    plan = make_plan(desired_state(env_fleet(tmp_path / "new", new)).config, live)
    text, data = render.format_text(plan), render.format_json(plan)
    line = f"      args.env.OPENAI_KEY: \"{fingerprint(KEY)}\" → \"{fingerprint(new)}\"  # forces restart"
    assert line in text.splitlines()
    field = json.loads(data)["changes"][1]["fields"][0]
    assert (field["path"], field["before"], field["after"]) == ("args.env.OPENAI_KEY", fingerprint(KEY),
                                                                fingerprint(new))
    for value in (KEY, new):
        assert value not in text and value not in data


def test_a_saved_plan_keeps_the_values_apply_puts(tmp_path: Path) -> None:
    plan = make_plan(desired_state(env_fleet(tmp_path, KEY)).config, NO_LIVE)
    assert plan_from_dict(json.loads(json.dumps(plan_to_dict(plan)))) == plan


def test_status_carries_no_env_value(tmp_path: Path) -> None:
    desired = desired_state(env_fleet(tmp_path, KEY))
    plan = make_plan(desired.config, NO_LIVE)
    doc = status_mod.document(plan, live_of(desired.config), desired.placed)
    assert KEY not in json.dumps(doc)


def test_redaction_walks_env_and_runtime_env() -> None:
    cfg = {"applications": [{"args": {"env": {"A": "x", "B": "${B}"}},
                             "runtime_env": {"env_vars": {"C": "y"}}, "deployments": [{"user_config": {"z": 1}}]}]}
    assert redact_config(cfg) == {"applications": [{
        "args": {"env": {"A": fingerprint("x"), "B": "${B}"}},
        "runtime_env": {"env_vars": {"C": fingerprint("y")}}, "deployments": [{"user_config": {"z": 1}}]}]}
    assert cfg["applications"][0]["args"]["env"]["A"] == "x"  # a copy: the original is untouched
    assert redact_at("args.env.A", "x") == fingerprint("x")
    assert redact_at("args.env", {"A": "x"}) == {"A": fingerprint("x")}
    assert redact_at("args.env.A", None) is None
    assert redact_at("deployments.engine.num_replicas", 2) == 2
    assert scrub(f"engine failed: bad key {KEY}", {KEY}) == f"engine failed: bad key {fingerprint(KEY)}"


def test_serves_messages_in_status_are_scrubbed_of_env_values(tmp_path: Path) -> None:
    desired = desired_state(env_fleet(tmp_path, KEY))
    live = live_of(desired.config)
    chat = live.apps["chat"]
    live.apps["chat"] = type(chat)(chat.name, "DEPLOY_FAILED", message=f"replica raised: OPENAI_KEY={KEY}",
                                   config=chat.config, deployments=chat.deployments)
    doc = status_mod.document(make_plan(desired.config, live), live, desired.placed)
    [row] = [r for r in doc["models"] if r["model"] == "chat"]
    assert KEY not in json.dumps(doc) and f"OPENAI_KEY={fingerprint(KEY)}" in row["message"]


# ---- the status API off loopback needs a token ------------------------------------------------

TOKEN = "t0ken-for-the-status-api-0123456789"


@pytest.mark.parametrize(("host", "token_env", "environ", "result"), [
    ("127.0.0.1", None, {}, None),
    ("localhost", None, {}, None),
    ("::1", None, {}, None),
    ("0.0.0.0", "FLEET_STATUS_TOKEN", {"FLEET_STATUS_TOKEN": TOKEN}, TOKEN),
    ("127.0.0.1", "FLEET_STATUS_TOKEN", {"FLEET_STATUS_TOKEN": TOKEN}, TOKEN),  # asked for: required there too
    ("0.0.0.0", None, {}, "Set daemon.token_env: FLEET_STATUS_TOKEN in the fleet file and export"),
    ("10.0.0.12", None, {}, "Set daemon.token_env: FLEET_STATUS_TOKEN"),
    ("fleet.example", None, {}, "Set daemon.token_env: FLEET_STATUS_TOKEN"),
    ("0.0.0.0", "FLEET_STATUS_TOKEN", {}, "FLEET_STATUS_TOKEN is not set in the daemon's environment"),
    ("0.0.0.0", "FLEET_STATUS_TOKEN", {"FLEET_STATUS_TOKEN": "short"}, "holds 5 characters"),
])
def test_who_may_serve_the_status_api_without_a_token(host: str, token_env: str | None, environ: dict[str, str],
                                                      result: str | None) -> None:
    from reconciler.fleetfiles.spec import DaemonSettings
    from reconciler.loop.status_api import ExposureError, check_exposure

    settings = DaemonSettings(host=host, token_env=token_env)
    if result is None or result == environ.get(token_env or ""):
        assert check_exposure(host, settings, environ) == result
    else:
        with pytest.raises(ExposureError, match=result):
            check_exposure(host, settings, environ)


def test_the_daemon_refuses_a_network_address_without_a_token(tmp_path: Path) -> None:
    write_fleet(tmp_path, {"fleet.yaml": BASE + "daemon:\n  host: 0.0.0.0\n"})
    r = CliRunner().invoke(main, ["daemon", str(tmp_path)])
    assert r.exit_code == 1
    assert "would listen on 0.0.0.0 without a token" in r.output and "daemon.token_env" in r.output


@pytest.fixture
def api(tmp_path: Path) -> Any:
    from fastapi.testclient import TestClient

    from reconciler.loop.daemon import Daemon
    from reconciler.loop.status_api import make_app

    daemon = Daemon(env_fleet(tmp_path, KEY))
    daemon._last_good = desired_state(tmp_path)  # as after a pass; nothing runs
    daemon._set(status={"format_version": "2", "models": [], "error": f"Serve said: OPENAI_KEY={KEY}"})
    with TestClient(make_app(daemon, token=TOKEN)) as client:
        yield client


@pytest.mark.parametrize("path", ["/", "/status", "/metrics", "/fragment", "/pulse"])
def test_with_a_token_every_route_but_healthz_needs_it(api: Any, path: str) -> None:
    assert api.get(path).status_code == 401
    assert api.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert api.get(path, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert api.get("/healthz").status_code == 200
    assert api.post(path, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 405


def test_a_browser_opens_the_page_with_the_token_once(api: Any) -> None:
    assert api.get("/?token=wrong").status_code == 401
    r = api.get(f"/?token={TOKEN}", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/" and TOKEN not in r.headers["set-cookie"]
    assert "httponly" in r.headers["set-cookie"].lower()
    page = api.get("/")  # the client keeps the cookie, as a browser does
    assert page.status_code == 200 and "vLLM Fleet" in page.text
    assert api.get("/status").status_code == 200


def test_the_status_api_scrubs_env_values_from_what_it_serves(api: Any) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    for path in ("/", "/status", "/fragment"):
        text = api.get(path, headers=auth).text
        assert KEY not in text and fingerprint(KEY) in text


def test_the_daemons_log_lines_are_scrubbed(tmp_path: Path) -> None:
    import io
    import logging

    from reconciler.fleetfiles.redact import ScrubFilter

    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(ScrubFilter(lambda: {KEY}))
    log = logging.getLogger("test_secrets.scrub")
    log.addHandler(handler)
    try:
        log.error("apply failed: %s", f"OPENAI_KEY={KEY}")
        try:
            raise RuntimeError(KEY)
        except RuntimeError:
            log.exception("with a traceback")
    finally:
        log.removeHandler(handler)
    assert KEY not in out.getvalue() and f"OPENAI_KEY={fingerprint(KEY)}" in out.getvalue()


def test_a_redacted_saved_plan_gets_its_values_back_only_from_matching_files(tmp_path: Path) -> None:
    from reconciler.change.plan import PlanFormatError, with_values_of

    plan = make_plan(desired_state(env_fleet(tmp_path / "a", KEY)).config, NO_LIVE)
    on_disk = json.dumps(plan_to_dict(plan, redact=True))
    assert KEY not in on_disk
    saved = plan_from_dict(json.loads(on_disk))
    assert with_values_of(saved, plan) == plan
    other = make_plan(desired_state(env_fleet(tmp_path / "b", "sk-abcdef999999")).config, NO_LIVE)
    with pytest.raises(PlanFormatError, match="fingerprints do not match"):
        with_values_of(saved, other)
