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
from producer.settings import read_config_file
from tests.conftest import (
    REPO,
    SECRET_A,
    SECRET_B,
    Receiver,
    endpoint,
    make_document,
    make_settings,
    run_python,
    write_config,
)
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
    """A config named *.json is read by the JSON parser (fast at thousands of endpoints)
    into the same settings as the same document in YAML."""
    path = write(tmp_path, json.dumps(minimal()), "config.json")
    as_yaml = write(tmp_path, yaml.safe_dump(minimal()), "config.yaml")
    assert load_settings(path, environ={}) == load_settings(as_yaml, environ={})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"broker": {}, "broker": {}}', "duplicate key 'broker'"),
        ('{"endpoints": [{"name": "a", "name": "b"}]}', "duplicate key 'name'"),
        ('{"endpoints": [\n  {"name": }]}', "not valid JSON (line 2)"),
        ("broker: {}", "not valid JSON (line 1)"),
        ("[1, 2]", "the top level must be a mapping"),
    ],
)
def test_json_configs_refuse_what_yaml_refuses(tmp_path: Path, text: str, expected: str) -> None:
    """In JSON too, a key written twice in one object is an error naming it (json keeps
    the last value), and a parse error names the line."""
    path = write(tmp_path, text, "config.json")
    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ={})
    message = str(caught.value)
    assert message.startswith(f"{path}: ")
    assert expected in message


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
    (minimal(url="http://example.com/"), "endpoints[0].url: http:// URLs are refused"),
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
    ({**minimal(), "endpoints": minimal()["endpoints"] * 2}, "endpoints[1].name: 'billing' is"),
    ({**minimal(), "endpoints": []}, "endpoints: needs at least one endpoint"),
    ("broker: [unclosed", "not valid YAML"),
    ("- a list", "top level must be a mapping"),
    # Hosts are checked as yarl normalises them, which is what aiohttp dials.
    (minimal(url="https://\u2460\u2461\u2466.0.0.1/hook"), "non-ASCII"),  # circled 127
    (minimal(url="https://\uff11\uff12\uff17.\uff10.\uff10.\uff11/"), "non-ASCII"),  # fullwidth
    (minimal(url="https://127\u30020\u30020\u30021/"), "non-ASCII"),  # ideographic full stop
    (minimal(url="https://127\uff0e0\uff0e0\uff0e1/"), "non-ASCII"),  # fullwidth full stop
    (minimal(url="https://\u2460\u2461\u2466.\u2460/"), "non-ASCII"),  # becomes 127.1
    (minimal(url="https://\uff10x7f.1/"), "non-ASCII"),  # becomes 0x7f.1
    (minimal(url="https://10\uff0e0\uff0e0\uff0e1:8443/"), "non-ASCII"),
    (minimal(url="https://127.0.0.1./hook"), "legacy numeric form"),
    (minimal(url="https://a_b.example.com/"), "endpoints[0].url: has a host with characters"),
    (minimal(url="https://a b.example.com/"), "endpoints[0].url: must not contain whitespace"),
    (minimal(url="https://a\x00b.example.com/"), "endpoints[0].url: must not contain whitespace"),
    (minimal(url="https://a%2eb.example.com/"), "endpoints[0].url: has a host with characters"),
    (minimal(url="https://exa..mple.com/"), "endpoints[0].url: has a host with characters"),
    (minimal(url="https://[fe80::1%25eth0]/"), "endpoints[0].url: has an invalid IPv6"),
    (minimal(url="https://@example.com/"), "endpoints[0].url: must not carry credentials"),
    ({**minimal(), "retry": {"no_retry_statuses": [200]}}, "retry.no_retry_statuses"),
    ({**minimal(), "retry": {"no_retry_statuses": [101]}}, "retry.no_retry_statuses"),
    # A message is unacknowledged while it waits for a token and during its attempt, and
    # RabbitMQ closes the channel after consumer_timeout (30 minutes by default).
    (minimal(rate_limit_per_s=1 / 1500), "endpoints[0].rate_limit_per_s: must be at least"),
    (minimal(rate_limit_per_s=1 / 1500), "consumer_timeout"),
    (minimal(timeout_s=901), "endpoints[0].timeout_s: must be at most 900 seconds"),
    ({**minimal(), "delivery": {"timeout_s": 3600}}, "delivery.timeout_s: must be at most"),
    ({**minimal(), "delivery": {"connect_timeout_s": 1000}}, "delivery.connect_timeout_s"),
    ({**minimal(), "delivery": {"connect_timeout_s": 1000}}, "consumer_timeout"),
    (minimal(rate_limit_per_s=1 / 1200, timeout_s=900), "rate-limit token"),
    (minimal(rate_limit_per_s=1 / 1200, timeout_s=900), "consumer_timeout"),
    ("security: {}\nsecurity:\n  allow_private_networks: true\n", "duplicate key 'security'"),
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
                st.sampled_from(
                    [
                        "name",
                        "url",
                        "events",
                        "secret",
                        "secret_env",
                        "timeout_s",
                        "max_in_flight",
                        "headers",
                    ]
                ),
                yaml_values,
            ),
            max_size=3,
        )
    },
)


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


def test_hosts_are_kept_in_the_form_that_is_dialled(tmp_path: Path) -> None:
    """Hosts are validated and exposed as yarl normalises them (IDNA as punycode, lower
    case, IPv6 without brackets): the form aiohttp connects to and the guard checks."""
    cases = {
        "https://B\u00fccher.Example/hook": "xn--bcher-kva.example",
        "https://fa\u00df.example/": "xn--fa-hia.example",
        "https://\uff4c\uff4f\uff43\uff41\uff4c\uff48\uff4f\uff53\uff54/": "localhost",
        "https://[2606:4700:4700::1111]:8443/": "2606:4700:4700::1111",
        "https://[::FFFF:127.0.0.1]/": "::ffff:7f00:1",
        "HTTPS://API.Example.COM/x": "api.example.com",
    }
    for url, host in cases.items():
        settings = load_settings(write(tmp_path, minimal(url=url)), environ={})
        assert settings.endpoints[0].host == host
        assert settings.endpoints[0].request_url.raw_host == host


def test_limits_that_fit_the_consumer_timeout_load(tmp_path: Path) -> None:
    """The largest accepted values: one token per 20 minutes with the default timeout, a
    900 s timeout without a rate limit, statuses 300 and 599."""
    document = minimal(rate_limit_per_s=1 / 1200)
    document["retry"] = {"no_retry_statuses": [300, 410, 599]}
    settings = load_settings(write(tmp_path, document), environ={})
    assert settings.endpoints[0].rate_limit_per_s == 1 / 1200
    document = minimal(timeout_s=900)
    document["delivery"] = {"timeout_s": 900, "connect_timeout_s": 900}
    assert load_settings(write(tmp_path, document), environ={}).endpoints[0].timeout_s == 900


DUPLICATES = [
    ("broker:\n  url: amqp://h/\n  url: amqp://other/\n", "'url' at line 3 (first at line 2)"),
    ("a: 1\nendpoints:\n  - name: x\n    events: [a]\n    events: [b]\n", "'events' at line 5"),
    ('{"security": {}, "security": {"allow_private_networks": true}}', "'security' at line 1"),
    ("x: {k: 1, k: 2}\n", "duplicate key 'k'"),
]


@pytest.mark.parametrize(("text", "expected"), DUPLICATES)
def test_duplicate_yaml_keys_are_refused_at_any_depth(
    tmp_path: Path, text: str, expected: str
) -> None:
    """A key written twice in one mapping (top level, nested, in a list item, JSON or flow
    style) is a ConfigError naming the key and its line: PyYAML would keep the last value."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ={})
    message = str(caught.value)
    assert message.startswith(f"{path}: duplicate key ")
    assert expected in message


def test_merge_keys_may_still_be_overridden(tmp_path: Path) -> None:
    """A key brought in by a YAML merge (<<) and set again is an override, not a duplicate."""
    text = "base: &b {timeout_s: 5, max_in_flight: 2}\nendpoint:\n  <<: *b\n  timeout_s: 7\n"
    loaded = read_config_file(write(tmp_path, text), environ={})
    assert loaded["endpoint"] == {"timeout_s": 7, "max_in_flight": 2}


async def test_idn_spelled_loopback_is_refused_before_send_test_or_run(
    tmp_path: Path, receiver: Receiver
) -> None:
    """With default security, endpoints whose hosts are loopback in non-ASCII spellings
    (yarl turns them into 127.0.0.1) stop send-test and the worker at config load, with the
    field named: the loopback receiver is never reached."""
    port = receiver.base_url.rsplit(":", 1)[1]
    hosts = (
        "\u2460\u2461\u2466.0.0.1",  # circled digits
        "\uff11\uff12\uff17.\uff10.\uff10.\uff11",  # fullwidth digits
        "127\u30020\u30020\u30021",  # ideographic full stops
        "127\uff0e0\uff0e0\uff0e1",  # fullwidth full stops
    )
    for host in hosts:
        document = make_document(
            "unused",
            [endpoint("loop", f"http://{host}:{port}/hook", ["a.#"])],
            security={"allow_private_networks": False},
        )
        config = write_config(tmp_path, document)
        for command in (["send-test", "--endpoint", "loop"], ["run"]):
            code, out, err = await run_python("-m", "worker", *command, "--config", str(config))
            assert code == 2, (command, out, err)
            assert "endpoints[0].url: writes an IP address with non-ASCII characters" in err
    assert receiver.requests == []


def test_every_problem_is_reported_at_its_field_and_only_once(tmp_path: Path) -> None:
    """Checks across fields name the field they concern, never "(top level)", and an
    invalid endpoint is not reported a second time as a missing one."""
    document = minimal()
    document["endpoints"] = [  # type: ignore[index]
        {**document["endpoints"][0], "name": "a"},  # type: ignore[index]
        {**document["endpoints"][0], "name": "b", "url": "http://example.com/"},  # type: ignore[index]
    ]
    path = write(tmp_path, document)
    with pytest.raises(ConfigError) as refused:
        load_settings(path, environ={})
    assert str(refused.value).splitlines() == [
        f"{path}: endpoints[1].url: http:// URLs are refused while security.require_https is true"
    ]
    with pytest.raises(ConfigError) as refused:
        load_settings(write(tmp_path, minimal(url="https://a b.example.com/")), environ={})
    assert len(str(refused.value).splitlines()) == 1
    assert "top level" not in str(refused.value)


def test_display_url_masks_query_values() -> None:
    """Query strings may hold tokens: output shows their keys, never their values."""
    endpoint = make_settings(
        "x",
        [
            {
                "name": "e",
                "url": "https://example.com/hook?token=s3cret&a=1&a=2",
                "events": ["#"],
                "secret": SECRET_A,
            }
        ],
    ).endpoints[0]
    assert endpoint.display_url == "https://example.com/hook?token=****&a=****&a=****"
    assert "s3cret" not in endpoint.display_url
