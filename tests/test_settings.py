"""Config loading: defaults, overrides, and one clear error per bad field, never a secret."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import hypothesis
import pytest
import yaml
from hypothesis import strategies as st

from producer.exceptions import ConfigError
from tests.conftest import REPO, SECRET_A, SECRET_B
from worker.settings import load_settings, settings_from_document


def write(tmp_path: Path, document: object, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(document) if not isinstance(document, str) else document)
    return path


def minimal(**endpoint: object) -> dict[str, object]:
    return {
        "broker": {"url": "amqp://guest:guest@127.0.0.1:5672/"},
        "endpoints": [
            {
                "name": "billing",
                "url": "https://billing.example.com/hooks",
                "events": ["order.*"],
                "secret": SECRET_A,
                **endpoint,
            }
        ],
    }


def test_defaults_fill_every_optional_key(tmp_path: Path) -> None:
    """Only broker.url and endpoints are required; the documented defaults apply."""
    settings = load_settings(write(tmp_path, minimal()), environ={})
    assert settings.broker.exchange == "webhooks"
    assert settings.worker.shutdown_timeout_s == 30
    assert settings.metrics.port == 9100
    assert settings.delivery.timeout_s == 10
    assert settings.delivery.max_body_bytes == 1_048_576
    assert settings.retry.delays_s == (5, 30, 120, 600, 1800, 3600, 10800, 21600)
    assert settings.retry.max_attempts == 9
    assert settings.retry.no_retry_statuses == {410}
    assert settings.security.require_https is True
    assert settings.security.allow_private_networks is False


def test_repo_config_yaml_is_valid() -> None:
    """The demo config.yaml shipped at the top of the repo loads."""
    settings = load_settings(REPO / "config.yaml", environ={})
    assert {e.name for e in settings.endpoints} == {"orders", "billing", "flaky", "ops"}


def test_json_config_loads(tmp_path: Path) -> None:
    """JSON is valid YAML and loads the same way."""
    path = write(tmp_path, json.dumps(minimal()), "config.json")
    assert load_settings(path, environ={}).endpoints[0].name == "billing"


def test_broker_url_env_override_and_secret_env(tmp_path: Path) -> None:
    """HOOKLINE_BROKER_URL replaces broker.url; secret_env names variables (several rotate)."""
    document = minimal(secret_env=["NEW_SECRET", "OLD_SECRET"])
    del document["endpoints"][0]["secret"]  # type: ignore[index]
    environ = {
        "HOOKLINE_BROKER_URL": "amqps://user:pw@rabbit.internal:5671/prod",
        "NEW_SECRET": SECRET_A,
        "OLD_SECRET": SECRET_B,
    }
    settings = load_settings(write(tmp_path, document), environ=environ)
    assert settings.broker.masked_url == "amqps://user:****@rabbit.internal:5671/prod"
    assert len(settings.endpoints[0].signing_keys) == 2


def test_settings_are_frozen(tmp_path: Path) -> None:
    """Settings cannot be changed after start-up."""
    settings = load_settings(write(tmp_path, minimal()), environ={})
    with pytest.raises(ValueError, match="frozen"):
        settings.worker.shutdown_timeout_s = 1  # type: ignore[misc]


BAD_DOCUMENTS = [
    ({**minimal(), "brokr": {}}, "brokr: unknown key"),
    ({**minimal(), "retry": {"delays": [1]}}, "retry.delays: unknown key"),
    ({**minimal(), "retry": {"delays_s": ["soon"]}}, "retry.delays_s[0]"),
    ({**minimal(), "retry": {"delays_s": [-1]}}, "retry.delays_s"),
    ({**minimal(), "delivery": {"timeout_s": "ten"}}, "delivery.timeout_s"),
    ({**minimal(), "metrics": {"port": 70000}}, "metrics.port"),
    (minimal(name="Bad Name"), "endpoints[0].name"),
    (minimal(events=["order.**x"]), "endpoints[0].events"),
    (minimal(events=[]), "endpoints[0].events"),
    (minimal(url="ftp://example.com/"), "endpoints[0].url"),
    (minimal(url="http://example.com/"), "require_https"),
    (minimal(url="https://user:pw@example.com/"), "endpoints[0].url"),
    (minimal(url="https://2130706433/hook"), "legacy numeric form"),
    (minimal(url="https://0177.0.0.1/hook"), "legacy numeric form"),
    (minimal(url="https://0x7f.0x0.0x0.0x1/hook"), "legacy numeric form"),
    (minimal(url="https://127.1/hook"), "legacy numeric form"),
    (minimal(secret="whsec_c2hvcnQ="), "at least 24"),
    (minimal(secret="not-a-secret-at-all-but-long-enough"), "whsec_"),
    (minimal(secret="whsec_!!!notbase64!!!notbase64!!!notbase64"), "base64"),
    (minimal(secret_env="MISSING_VAR"), "both"),
    (minimal(headers={"Webhook-Id": "x"}), "cannot be overridden"),
    (minimal(max_in_flight=0), "endpoints[0].max_in_flight"),
    ({"endpoints": minimal()["endpoints"]}, "broker"),
    ({"broker": {"url": "http://x/"}, "endpoints": minimal()["endpoints"]}, "broker.url"),
    ({**minimal(), "endpoints": minimal()["endpoints"] * 2}, "used twice"),
    ("broker: [unclosed", "not valid YAML"),
    ("- a list", "top level must be a mapping"),
]


@pytest.mark.parametrize(("document", "expected"), BAD_DOCUMENTS)
def test_bad_config_names_file_and_field(tmp_path: Path, document: object, expected: str) -> None:
    """Each mistake gives a ConfigError naming the file and the field."""
    path = write(tmp_path, document)
    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ={})
    message = str(caught.value)
    assert str(path) in message
    assert expected in message


def test_missing_file_and_missing_secret_env(tmp_path: Path) -> None:
    """A missing file and an unset secret_env variable are clear errors."""
    with pytest.raises(ConfigError, match="file not found"):
        load_settings(tmp_path / "nope.yaml", environ={})
    document = minimal(secret_env="HOOKLINE_TEST_UNSET")
    del document["endpoints"][0]["secret"]  # type: ignore[index]
    with pytest.raises(ConfigError, match="HOOKLINE_TEST_UNSET is not set"):
        load_settings(write(tmp_path, document), environ={})


def test_secrets_never_appear_in_errors_or_reprs(tmp_path: Path) -> None:
    """Neither a bad secret nor a good one is echoed by errors, reprs or check-config."""
    short = "whsec_c2hvcnRzZWNyZXQ="
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, minimal(secret=short)), environ={})
    assert short not in str(caught.value)
    assert "c2hvcnRzZWNyZXQ" not in str(caught.value)
    settings = load_settings(write(tmp_path, minimal()), environ={})
    assert SECRET_A not in repr(settings)
    assert SECRET_A.removeprefix("whsec_") not in repr(settings.endpoints[0].signing_keys)
    assert "guest:guest" not in repr(settings)
    path = write(tmp_path, minimal())
    output = subprocess.run(
        [sys.executable, "-m", "worker", "check-config", "--config", str(path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
    )
    assert SECRET_A not in output.stdout + output.stderr
    assert "guest:****@" in output.stdout


def test_production_example_config_is_valid(tmp_path: Path) -> None:
    """deploy/config.production.yaml loads once its secret variables are set."""
    environ = {
        "BILLING_WEBHOOK_SECRET": SECRET_A,
        "BILLING_WEBHOOK_SECRET_PREVIOUS": SECRET_B,
        "ANALYTICS_WEBHOOK_SECRET": SECRET_A,
    }
    settings = load_settings(REPO / "deploy" / "config.production.yaml", environ=environ)
    assert settings.security.require_https
    assert len(settings.endpoint("billing").signing_keys) == 2


SECTION_KEYS = {
    "broker": ["url", "exchange", "queue_type", "publish_timeout_s", "tls", "heartbeat_s"],
    "worker": ["shutdown_timeout_s", "log_format", "log_level"],
    "metrics": ["host", "port", "queue_poll_s"],
    "delivery": ["timeout_s", "max_body_bytes", "max_in_flight", "proxy_url"],
    "retry": ["delays_s", "no_retry_statuses"],
    "security": ["require_https", "allow_private_networks", "allowed_networks", "ca_bundle"],
}
yaml_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=30)
)
yaml_values = st.recursive(
    yaml_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=12,
)
fuzzed_sections = st.fixed_dictionaries(
    {},
    optional={
        section: st.dictionaries(st.sampled_from([*keys, "typo"]), yaml_values, max_size=4)
        for section, keys in SECTION_KEYS.items()
    }
    | {
        "endpoints": st.lists(
            st.dictionaries(
                st.sampled_from(["name", "url", "events", "secret", "secret_env", "timeout_s",
                                 "max_in_flight", "headers"]),
                yaml_values,
            ),
            max_size=3,
        )
    },
)  # fmt: skip


@hypothesis.settings(max_examples=400, deadline=None)
@hypothesis.given(fuzzed_sections)
def test_fuzzed_configs_fail_only_with_config_error(document: dict[str, object]) -> None:
    """Any document either loads or raises ConfigError naming the file: never another error."""
    try:
        settings_from_document(document, Path("fuzz.yaml"), {})
    except ConfigError as exc:
        message = str(exc)
    else:
        return
    assert message.startswith("fuzz.yaml: ")


@hypothesis.settings(max_examples=200, deadline=None)
@hypothesis.given(st.text(max_size=200))
def test_fuzzed_yaml_text_fails_only_with_config_error(tmp_path_factory: object, text: str) -> None:
    """Arbitrary text in config.yaml gives settings or a ConfigError, nothing else."""
    path = tmp_path_factory.mktemp("fuzz") / "config.yaml"  # type: ignore[attr-defined]
    path.write_text(text)
    with contextlib.suppress(ConfigError):
        load_settings(path, environ={})


def test_tls_proxy_and_ca_bundle_settings_are_checked(tmp_path: Path) -> None:
    """broker.tls needs amqps://, files must exist, and certificate checks cannot be disabled."""
    cases = [
        ({"broker": {"url": "amqp://h/", "tls": {"ca_file": "/nonexistent.pem"}}}, "ca_file"),
        ({"broker": {"url": "amqp://h/", "tls": {}}}, "needs an amqps:// URL"),
        ({"broker": {"url": "amqps://h/?no_verify_ssl=1"}}, "certificate checks"),
        ({"security": {"ca_bundle": str(tmp_path / "missing.pem")}}, "security.ca_bundle"),
        ({"delivery": {"proxy_url": "socks5://proxy:1080"}}, "delivery.proxy_url"),
        ({"security": {"allowed_networks": [1]}}, "CIDR"),
        ({"security": {"allowed_networks": ["10.0.0.1/8"]}}, "allowed_networks"),
    ]
    for overrides, expected in cases:
        document = minimal()
        for section, values in overrides.items():
            document[section] = {**document.get(section, {}), **values}  # type: ignore[dict-item]
        with pytest.raises(ConfigError, match=expected):
            load_settings(write(tmp_path, document), environ={})
    document = minimal()
    document["delivery"] = {"proxy_url": "http://user:hunter2@egress.internal:3128"}
    settings = load_settings(write(tmp_path, document), environ={})
    assert "hunter2" not in repr(settings)
