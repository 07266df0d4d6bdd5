"""The worker's settings: one frozen object built at start-up and passed in explicitly.

Built from ``config.yaml`` plus environment overrides (``HOOKLINE_BROKER_URL``, and each
endpoint's ``secret_env``). This module and ``producer.settings`` are the only readers
of the environment.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    ConfigDict,
    Field,
    FilePath,
    PrivateAttr,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from yarl import URL

from producer.settings import (
    BrokerSettings,
    Model,
    field_problem,
    format_validation_error,
    read_config_file,
)
from worker.filters import Filter, parse_filter
from worker.netguard import is_numeric_host
from worker.signing import SigningKey

ENDPOINT_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
# Tenants are opaque labels chosen by the sender (a customer id, an account slug): printable
# ASCII without spaces, so they fit in a URL query, a log line and a Prometheus label.
TENANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}$")
MAX_DESCRIPTION_CHARS = 1000
# Bounds on what one endpoint may hold: every pattern is a broker binding, every header
# goes out with every request.
MAX_PATTERNS = 100
MAX_HEADERS = 50
MAX_HEADER_VALUE_CHARS = 4096
MAX_URL_CHARS = 2048
PATTERN_WORD_RE = re.compile(r"^(\*|#|[A-Za-z0-9_-]+)$")
# What a host name may be made of once yarl has normalised it (lower case, IDNA as
# punycode): anything else (spaces, underscores, NUL, '%', ...) means that the resolver,
# the proxy and the guard may each read a different host.
HOST_NAME_RE = re.compile(r"(?:[a-z0-9-]{1,63}\.)*[a-z0-9-]{1,63}\.?")
MAX_HOST_CHARS = 253
HEADER_NAME_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
# Headers Hookline owns; an endpoint may not override them.
RESERVED_HEADERS = frozenset(
    {
        "content-type",
        "content-length",
        "host",
        "user-agent",
        "webhook-id",
        "webhook-timestamp",
        "webhook-signature",
        "transfer-encoding",
        "connection",
    }
)
MAX_DELAY_S = 30 * 24 * 3600  # RabbitMQ TTLs are 32-bit milliseconds; a month is plenty.
# RabbitMQ closes a channel that holds a delivery unacknowledged for longer than its
# consumer_timeout (30 minutes by default), and a message stays unacknowledged while it
# waits for its rate-limit token and during its attempt. Each bound leaves room for the
# other and for recording the outcome.
MAX_ATTEMPT_S = 900.0
MIN_RATE_LIMIT_PER_S = 1 / 1200
MAX_UNACKED_S = 1500.0


def _within_consumer_timeout(seconds: float) -> float:
    if seconds > MAX_ATTEMPT_S:
        raise ValueError(
            f"must be at most {MAX_ATTEMPT_S:g} seconds: a message stays unacknowledged "
            "during its attempt, and RabbitMQ closes the channel of a consumer that holds "
            "one longer than its consumer_timeout (30 minutes by default)"
        )
    return seconds


PositiveSeconds = Annotated[float, Field(gt=0)]
AttemptSeconds = Annotated[float, Field(gt=0), AfterValidator(_within_consumer_timeout)]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class WorkerSection(Model):
    shutdown_timeout_s: PositiveSeconds = 30.0
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # Endpoints get a channel each up to this count; beyond it, consumers share channels
    # (see worker.channels). RabbitMQ's default ceiling is 2,047 channels per connection,
    # and a reload that replaces every endpoint holds old and new channels at once.
    channel_per_endpoint_up_to: int = Field(default=500, ge=0, le=800)


class MetricsSettings(Model):
    # Metrics are scraped from outside the container, so every interface by default.
    host: str = "0.0.0.0"  # noqa: S104  # nosec B104
    port: int = Field(default=9100, ge=0, le=65535)
    queue_poll_s: PositiveSeconds = 15.0
    # Endpoints with series of their own, at most (the rest are summed as endpoint="_other").
    max_endpoint_series: int = Field(default=200, ge=0, le=5000)
    # Endpoint queues whose depth one poll round reads, at most (the rest in later rounds).
    queue_polls_per_round: int = Field(default=500, ge=1, le=10_000)


class DeliverySettings(Model):
    timeout_s: AttemptSeconds = 10.0
    connect_timeout_s: AttemptSeconds = 5.0
    max_body_bytes: int = Field(default=1_048_576, gt=0)
    max_in_flight: int = Field(default=32, ge=1, le=1000)
    max_response_bytes: int = Field(default=65_536, ge=0)
    proxy_url: SecretStr | None = None

    @field_validator("proxy_url")
    @classmethod
    def _check_proxy(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            parts = urlsplit(value.get_secret_value())
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError("must be an http:// or https:// proxy URL")
        return value


class RetrySettings(Model):
    delays_s: tuple[float, ...] = (5, 30, 120, 600, 1800, 3600, 10800, 21600)
    no_retry_statuses: frozenset[int] = frozenset({410})

    @field_validator("delays_s")
    @classmethod
    def _check_delays(cls, delays: tuple[float, ...]) -> tuple[float, ...]:
        for delay in delays:
            if not 0.001 <= delay <= MAX_DELAY_S:
                raise ValueError(f"each delay must be between 0.001 and {MAX_DELAY_S} seconds")
        return delays

    @field_validator("no_retry_statuses")
    @classmethod
    def _check_statuses(cls, statuses: frozenset[int]) -> frozenset[int]:
        # 2xx is a delivery and 1xx never ends a request, so neither can be refused.
        if any(not 300 <= status <= 599 for status in statuses):
            raise ValueError("statuses must be HTTP status codes from 300 to 599")
        return statuses

    @property
    def max_attempts(self) -> int:
        return 1 + len(self.delays_s)


class SecuritySettings(Model):
    require_https: bool = True
    allow_private_networks: bool = False
    allowed_networks: tuple[Network, ...] = ()
    ca_bundle: FilePath | None = None

    @field_validator("allowed_networks", mode="before")
    @classmethod
    def _networks_are_cidr_strings(cls, value: object) -> object:
        # Without this, pydantic would read a bare number as a /32 network.
        if isinstance(value, list | tuple) and not all(isinstance(v, str) for v in value):
            raise ValueError("must be a list of CIDR strings such as 10.1.0.0/16")
        return value


class CircuitBreakerSettings(Model):
    """Per worker and endpoint: after ``failure_threshold`` failed attempts in a row the
    worker stops consuming that endpoint for a cool-down that doubles on every failed probe
    up to ``max_cooldown_s``."""

    enabled: bool = True
    failure_threshold: int = Field(default=10, ge=1)
    cooldown_s: PositiveSeconds = 30.0
    max_cooldown_s: PositiveSeconds = 600.0

    @model_validator(mode="after")
    def _check_bounds(self) -> CircuitBreakerSettings:
        if self.max_cooldown_s < self.cooldown_s:
            raise ValueError("max_cooldown_s must be at least cooldown_s")
        return self


class OperationalEventsSettings(Model):
    """Hookline's own events (``hookline.endpoint.failing`` and others) on the exchange."""

    enabled: bool = True


class RegistrySettings(Model):
    """Endpoints kept in PostgreSQL and managed through the API (``python -m api``)."""

    # postgresql:// URL; HOOKLINE_DATABASE_URL overrides it. Without it, endpoints come
    # from this file only.
    database_url: SecretStr | None = None
    # Encrypts endpoint secrets at rest: base64 of 32 random bytes, or several separated by
    # commas (the first encrypts, every one decrypts: how the key is rotated).
    # HOOKLINE_SECRET_KEY overrides it; keep it in the environment, not in this file.
    secret_key: SecretStr | None = None
    max_endpoints_per_tenant: int = Field(default=1000, ge=1, le=1_000_000)
    # What a tenant key may subscribe to. "prefixed": only event types whose first word is
    # its tenant (acme.order.created for tenant acme), so that one tenant's endpoints never
    # receive another's events. "any": every type, for tenants that are teams of one
    # organisation rather than customers. Admin keys may subscribe to anything.
    tenant_events: Literal["prefixed", "any"] = "prefixed"
    # Workers re-read every endpoint this often, whatever notifications they had.
    reconcile_s: PositiveSeconds = 30.0
    # Where a worker keeps the last endpoint set it read (secrets still encrypted), to
    # start with it while the database is down.
    snapshot_path: Path | None = None
    connect_timeout_s: PositiveSeconds = 5.0

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            parts = urlsplit(value.get_secret_value())
            if parts.scheme not in ("postgresql", "postgres") or not (
                parts.hostname or "host=" in parts.query
            ):
                raise ValueError("must be a postgresql:// URL with a host")
        return value

    @property
    def enabled(self) -> bool:
        return self.database_url is not None


class ApiSection(Model):
    """The control plane's HTTP server (``python -m api``)."""

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    max_body_bytes: int = Field(default=65_536, ge=1024, le=16_777_216)


class EndpointSettings(Model):
    name: str
    url: str
    events: tuple[str, ...] = Field(min_length=1)
    tenant: str | None = None
    description: str | None = Field(default=None, max_length=MAX_DESCRIPTION_CHARS)
    # Events whose envelope does not match are acknowledged without a request.
    filter: Filter | None = None
    # Paused: events still queue up, nothing is attempted until it is resumed.
    paused: bool = False
    secret: SecretStr | tuple[SecretStr, ...] | None = None
    secret_env: str | tuple[str, ...] | None = None
    timeout_s: AttemptSeconds | None = None
    max_in_flight: int | None = Field(default=None, ge=1, le=1000)
    rate_limit_per_s: float | None = Field(default=None, gt=0, le=100_000)
    headers: dict[str, str] = Field(default_factory=dict)
    # Series of its own in /metrics whatever its state (within metrics.max_endpoint_series).
    metrics_detail: bool = False

    _signing_keys: tuple[SigningKey, ...] = PrivateAttr(default=())
    # From the registry: the API binds and unbinds its queue (see from_registry).
    _from_registry: bool = PrivateAttr(default=False)

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    @field_validator("filter", mode="before")
    @classmethod
    def _compile_filter(cls, value: object) -> object:
        if value is None or isinstance(value, Filter):
            return value
        return parse_filter(value)

    @field_validator("tenant")
    @classmethod
    def _check_tenant(cls, tenant: str | None) -> str | None:
        if tenant is not None and not TENANT_RE.fullmatch(tenant):
            raise ValueError("must be 1-128 of [A-Za-z0-9_.:@-], starting with a letter or digit")
        return tenant

    @field_validator("description")
    @classmethod
    def _check_description(cls, description: str | None) -> str | None:
        if description is not None:
            if any(ord(char) < 32 and char not in "\n\t" for char in description):
                raise ValueError("must not contain control characters")
            _check_unicode(description)
        return description

    @field_validator("name")
    @classmethod
    def _check_name(cls, name: str) -> str:
        if not ENDPOINT_NAME_RE.fullmatch(name):
            raise ValueError("must match [a-z0-9][a-z0-9_-]{0,62}")
        return name

    @field_validator("url")
    @classmethod
    def _check_url(cls, url: str) -> str:
        if len(url) > MAX_URL_CHARS:
            raise ValueError(f"must be at most {MAX_URL_CHARS} characters")
        if any(char.isspace() or ord(char) < 32 or ord(char) == 127 for char in url):
            # yarl drops some of these before dialling: what is stored must be what is dialled.
            raise ValueError("must not contain whitespace or control characters")
        _check_unicode(url)
        # The same parser and normalisation as the request: yarl, as aiohttp uses it.
        try:
            written = URL(url, encoded=True)
            parsed = URL(url)
            port = parsed.explicit_port
        except (ValueError, TypeError, UnicodeError):
            raise ValueError("is not a valid URL") from None
        if parsed.scheme not in ("http", "https") or not parsed.raw_host:
            raise ValueError("must be an http:// or https:// URL with a host")
        if "@" in (written.raw_authority or ""):
            raise ValueError("must not carry credentials; use headers for authentication")
        if port == 0 or parsed.raw_fragment:
            raise ValueError("is not a valid URL")
        problem = _host_problem(written.raw_host or "", parsed.raw_host)
        if problem is not None:
            raise ValueError(problem)
        return url

    @field_validator("rate_limit_per_s")
    @classmethod
    def _check_rate(cls, rate: float | None) -> float | None:
        if rate is not None and rate < MIN_RATE_LIMIT_PER_S:
            raise ValueError(
                "must be at least 1/1200 (one event per 20 minutes): a message waits for its "
                "turn unacknowledged, and RabbitMQ closes the channel of a consumer that holds "
                "one longer than its consumer_timeout (30 minutes by default)"
            )
        return rate

    @field_validator("events")
    @classmethod
    def _check_patterns(cls, patterns: tuple[str, ...]) -> tuple[str, ...]:
        if len(patterns) > MAX_PATTERNS:
            raise ValueError(f"at most {MAX_PATTERNS} patterns")
        for pattern in patterns:
            if len(pattern) > 255 or not all(
                PATTERN_WORD_RE.fullmatch(word) for word in pattern.split(".")
            ):
                raise ValueError(
                    f"{pattern!r} is not a topic pattern (dot-separated words, '*' or '#')"
                )
        return patterns

    @field_validator("headers")
    @classmethod
    def _check_headers(cls, headers: dict[str, str]) -> dict[str, str]:
        if len(headers) > MAX_HEADERS:
            raise ValueError(f"at most {MAX_HEADERS} headers")
        for name, value in headers.items():
            if not HEADER_NAME_RE.fullmatch(name):
                raise ValueError(f"{name[:80]!r} is not a valid header name")
            if name.lower() in RESERVED_HEADERS:
                raise ValueError(f"{name!r} is set by Hookline and cannot be overridden")
            if "\r" in value or "\n" in value:
                raise ValueError(f"the value of {name!r} contains a line break")
            if any((ord(char) < 32 and char != "\t") or ord(char) == 127 for char in value):
                raise ValueError(f"the value of {name!r} contains a control character")
            if len(value) > MAX_HEADER_VALUE_CHARS:
                raise ValueError(
                    f"the value of {name!r} is longer than {MAX_HEADER_VALUE_CHARS} characters"
                )
            _check_unicode(value)
        return headers

    @model_validator(mode="after")
    def _resolve_secrets(self, info: ValidationInfo) -> EndpointSettings:
        environ: Mapping[str, str] = (info.context or {}).get("environ", {})
        inline = _as_tuple(self.secret)
        named = _as_tuple(self.secret_env)
        if not inline and not named:
            raise ValueError("needs 'secret' or 'secret_env'")
        if inline and named:
            raise ValueError("set either 'secret' or 'secret_env', not both")
        values = [secret.get_secret_value() for secret in inline if isinstance(secret, SecretStr)]
        for variable in named:
            value = environ.get(str(variable))
            if not value:
                raise ValueError(f"secret_env: environment variable {variable} is not set")
            values.append(value)
        self._signing_keys = tuple(SigningKey.parse(value) for value in values)
        return self

    @property
    def filter_document(self) -> dict[str, Any] | None:
        """The filter as JSON, as it was given (what the API stores and shows)."""
        return self.filter.document if self.filter is not None else None

    @property
    def from_registry(self) -> bool:
        """Managed through the API, which binds and unbinds the queue in the same
        transaction as the row: a worker that applies a change later must not undo a
        binding the API has made since."""
        return self._from_registry

    def mark_from_registry(self) -> EndpointSettings:
        self._from_registry = True
        return self

    @property
    def signing_keys(self) -> tuple[SigningKey, ...]:
        """Decoded once at load; the first signs as the newest during a rotation."""
        return self._signing_keys

    @property
    def request_url(self) -> URL:
        """The URL as aiohttp will request it: its host normalised (IDNA/UTS-46, lower
        case), which is the host every check must look at."""
        return URL(self.url)

    @property
    def display_url(self) -> str:
        """The URL fit for output: query values (which may hold tokens) masked."""
        return display_url(self.url)

    @property
    def host(self) -> str:
        """The host aiohttp dials: ASCII (punycode), an IPv6 literal without brackets."""
        return self.request_url.raw_host or ""


def display_url(written: str) -> str:
    """An endpoint URL fit for output: query values (which may hold tokens) masked."""
    url = URL(written)
    if not url.query_string:
        return str(url)
    return str(url.with_query([(key, "****") for key, _ in url.query.items()]))


def _check_unicode(text: str) -> None:
    """Refuses what no database column or HTTP request can carry: lone surrogates."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("is not valid Unicode (a lone surrogate)") from None


def _host_problem(written: str, host: str) -> str | None:
    """Why the normalised ``host`` (``written`` before normalisation) is refused, if it is."""
    if ":" in host:
        if not written.isascii():
            return "writes an IP address with non-ASCII characters; write the ASCII address"
        if "%" not in host:
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                pass
            else:
                return None
        return "has an invalid IPv6 address (zone identifiers are not accepted)"
    if len(host) > MAX_HOST_CHARS or not HOST_NAME_RE.fullmatch(host):
        return (
            "has a host with characters other than letters, digits, hyphens and dots "
            "(or an empty or overlong label)"
        )
    # Legacy forms hide what an endpoint points at.
    if is_numeric_host(host):
        if not written.isascii():
            # Circled, fullwidth or ideographic-dot spellings of 127.0.0.1 become the ASCII
            # literal on the way to the socket; the config must say what is dialled.
            return "writes an IP address with non-ASCII characters; write the ASCII address"
        if host.endswith(".") or not _is_canonical_ipv4(host):
            return "writes an IPv4 address in a legacy numeric form; use a.b.c.d"
    return None


def _is_canonical_ipv4(host: str) -> bool:
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return False
    return True


def _as_tuple(value: object) -> tuple[object, ...]:
    if value is None:
        return ()
    return value if isinstance(value, tuple) else (value,)


class Settings(Model):
    broker: BrokerSettings
    worker: WorkerSection = WorkerSection()
    metrics: MetricsSettings = MetricsSettings()
    delivery: DeliverySettings = DeliverySettings()
    retry: RetrySettings = RetrySettings()
    security: SecuritySettings = SecuritySettings()
    circuit_breaker: CircuitBreakerSettings = CircuitBreakerSettings()
    operational_events: OperationalEventsSettings = OperationalEventsSettings()
    registry: RegistrySettings = RegistrySettings()
    api: ApiSection = ApiSection()
    endpoints: tuple[EndpointSettings, ...] = ()

    @model_validator(mode="after")
    def _check_endpoints(self) -> Settings:
        # Here rather than as min_length: this runs only once every endpoint is valid, so a
        # bad endpoint is not reported a second time as "no endpoints".
        if not self.endpoints and not self.registry.enabled:
            raise field_problem(
                "endpoints", "needs at least one endpoint (or registry.database_url)"
            )
        seen: set[str] = set()
        for index, endpoint in enumerate(self.endpoints):
            if endpoint.name in seen:
                raise field_problem(f"endpoints[{index}].name", f"{endpoint.name!r} is used twice")
            seen.add(endpoint.name)
            for field, problem in self.endpoint_problems(endpoint):
                raise field_problem(f"endpoints[{index}].{field}", problem)
        return self

    def endpoint_problems(self, endpoint: EndpointSettings) -> list[tuple[str, str]]:
        """What these settings refuse in an endpoint that is valid on its own: the same
        checks for the config file and for the API (``(field, message)`` pairs)."""
        problems = []
        if self.security.require_https and endpoint.request_url.scheme != "https":
            problems.append(
                ("url", "http:// URLs are refused while security.require_https is true")
            )
        rate = endpoint.rate_limit_per_s
        if rate is not None and 1 / rate + self.timeout_for(endpoint) > MAX_UNACKED_S:
            problems.append(
                (
                    "rate_limit_per_s",
                    "the wait for a rate-limit token (1 / rate_limit_per_s) plus timeout_s must "
                    f"not exceed {MAX_UNACKED_S:g} seconds: the message is unacknowledged all "
                    "that time, and RabbitMQ closes the channel of a consumer that holds one "
                    "longer than its consumer_timeout (30 minutes by default)",
                )
            )
        return problems

    def endpoint(self, name: str) -> EndpointSettings:
        for endpoint in self.endpoints:
            if endpoint.name == name:
                return endpoint
        raise KeyError(name)

    def timeout_for(self, endpoint: EndpointSettings) -> float:
        return endpoint.timeout_s if endpoint.timeout_s is not None else self.delivery.timeout_s

    def max_in_flight_for(self, endpoint: EndpointSettings) -> int:
        if endpoint.max_in_flight is not None:
            return endpoint.max_in_flight
        return self.delivery.max_in_flight


def load_settings(path: Path, environ: Mapping[str, str] | None = None) -> Settings:
    """Build the settings from ``path`` and the environment, or raise :class:`ConfigError`."""
    environ = os.environ if environ is None else environ
    document = read_config_file(path, environ)
    return settings_from_document(document, path, environ)


def settings_from_document(
    document: dict[str, Any], path: Path, environ: Mapping[str, str]
) -> Settings:
    try:
        return Settings.model_validate(document, context={"environ": environ})
    except ValidationError as exc:
        raise format_validation_error(path, exc) from None
