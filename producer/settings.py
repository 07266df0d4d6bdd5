"""Reading ``config.yaml``: the file, the environment overrides and the ``broker`` section.

This module and ``worker.settings`` are the only places that read the environment.
"""

from __future__ import annotations

import json
import os
import re
import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit, urlunsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    FilePath,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from producer.exceptions import ConfigError

BROKER_URL_ENV = "HOOKLINE_BROKER_URL"
DATABASE_URL_ENV = "HOOKLINE_DATABASE_URL"
SECRET_KEY_ENV = "HOOKLINE_SECRET_KEY"  # noqa: S105 - the variable's name, not a secret
EXCHANGE_NAME_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,200}$")


class Model(BaseModel):
    """Base of every settings model: frozen, and unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class BrokerTLS(Model):
    """Files for amqps://: a CA bundle for private CAs, and a client certificate if required."""

    ca_file: FilePath | None = None
    cert_file: FilePath | None = None
    key_file: FilePath | None = None

    @model_validator(mode="after")
    def _check_pair(self) -> BrokerTLS:
        if self.key_file is not None and self.cert_file is None:
            raise ValueError("key_file needs cert_file")
        return self

    def context(self) -> ssl.SSLContext:
        """Always verifies the broker's certificate and host name."""
        context = ssl.create_default_context(cafile=self.ca_file)
        if self.cert_file is not None:
            context.load_cert_chain(self.cert_file, self.key_file)
        return context


class BrokerSettings(Model):
    url: SecretStr
    exchange: str = "webhooks"
    publish_timeout_s: float = Field(default=10.0, gt=0)
    publish_retry_for_s: float = Field(default=30.0, ge=0)
    unrouted_max_messages: int = Field(default=10_000, ge=1)
    heartbeat_s: int = Field(default=30, ge=0)
    connect_retry_max_s: float = Field(default=30.0, gt=0)
    reconnect_interval_s: float = Field(default=1.0, gt=0)
    queue_type: Literal["quorum", "classic"] = "quorum"
    tls: BrokerTLS | None = None

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: SecretStr) -> SecretStr:
        parts = urlsplit(value.get_secret_value())
        if parts.scheme not in ("amqp", "amqps") or not parts.hostname:
            raise ValueError("must be an amqp:// or amqps:// URL with a host")
        if "no_verify_ssl" in parts.query:
            raise ValueError("must not turn off certificate checks (no_verify_ssl)")
        return value

    @model_validator(mode="after")
    def _check_tls(self) -> BrokerSettings:
        if self.tls is not None and not self.url.get_secret_value().startswith("amqps://"):
            raise ValueError("broker.tls needs an amqps:// URL")
        return self

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context for amqps:// (certificates always verified), else None."""
        if not self.url.get_secret_value().startswith("amqps://"):
            return None
        return (self.tls or BrokerTLS()).context()

    @field_validator("exchange")
    @classmethod
    def _check_exchange(cls, value: str) -> str:
        if not EXCHANGE_NAME_RE.fullmatch(value) or value.startswith("amq."):
            raise ValueError("must be 1-200 of [A-Za-z0-9_.:-] and not start with 'amq.'")
        return value

    @property
    def masked_url(self) -> str:
        return mask_url(self.url.get_secret_value())

    def connection_url(self) -> str:
        """The URL to connect with; heartbeat goes in the query so aio-pika applies it."""
        url = self.url.get_secret_value()
        if "heartbeat=" in url:
            return url
        return f"{url}{'&' if '?' in url else '?'}heartbeat={self.heartbeat_s}"


def mask_url(url: str) -> str:
    """The URL with its password replaced, fit for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:****@{netloc}"))


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A mapping names the same key twice."""

    def __init__(self, key: object, first_line: int, line: int) -> None:
        super().__init__(problem=f"duplicate key {str(key)[:80]!r}")
        self.key = key
        self.first_line = first_line
        self.line = line


if TYPE_CHECKING:
    _SafeLoader = yaml.SafeLoader
else:
    # libyaml's parser when PyYAML was built with it: ten times faster on a config with
    # thousands of endpoints; the same safe constructor either way.
    _SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class UniqueKeyLoader(_SafeLoader):
    """``SafeLoader`` that refuses a key written twice in one mapping, at any depth.

    PyYAML keeps the last value silently, so a second ``security:`` block would quietly
    replace the first. Keys brought in by a ``<<`` merge may still be overridden: that is
    what a merge is for.
    """

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    if key in seen:
                        raise DuplicateKeyError(key, seen[key], line)
                    seen[key] = line
                except TypeError:
                    continue  # unhashable: SafeLoader reports it
        return super().construct_mapping(node, deep=deep)  # type: ignore[arg-type]


def read_config_file(path: Path, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Load YAML from ``path`` (JSON if its name ends in ``.json``: YAML's parser takes about a
    second over 10,000 endpoints, JSON's a few milliseconds, which a reload notices) and
    apply the environment overrides."""
    environ = os.environ if environ is None else environ
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc.__class__.__name__}") from None
    document = _parse_json(path, text) if path.suffix == ".json" else _parse_yaml(path, text)
    if document is None:
        document = {}
    if not isinstance(document, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    for variable, section, key in (
        (BROKER_URL_ENV, "broker", "url"),
        (DATABASE_URL_ENV, "registry", "database_url"),
        (SECRET_KEY_ENV, "registry", "secret_key"),
    ):
        override = environ.get(variable)
        if override:
            current = document.get(section)
            document[section] = {**(current if isinstance(current, dict) else {}), key: override}
    return document


def _parse_json(path: Path, text: str) -> Any:
    def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        document: dict[str, Any] = {}
        for key, value in pairs:
            if key in document:
                raise ConfigError(
                    f"{path}: duplicate key {key[:80]!r}; each key may appear once in an object"
                )
            document[key] = value
        return document

    try:
        return json.loads(text, object_pairs_hook=unique_keys)
    except (ValueError, RecursionError) as exc:
        line = f" (line {exc.lineno})" if isinstance(exc, json.JSONDecodeError) else ""
        raise ConfigError(f"{path}: not valid JSON{line}") from None


def _parse_yaml(path: Path, text: str) -> Any:
    try:
        # UniqueKeyLoader is a SafeLoader: it constructs only plain YAML types.
        document = yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506  # nosec B506
    except DuplicateKeyError as exc:
        raise ConfigError(
            f"{path}: {exc.problem} at line {exc.line} (first at line {exc.first_line}); "
            "each key may appear once in a mapping"
        ) from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise ConfigError(f"{path}: not valid YAML{line}") from None
    return document


FIELD_PROBLEM = "hookline_field_problem"


def field_problem(field: str, message: str) -> PydanticCustomError:
    """A problem found by a check across fields, reported at the field it concerns (for
    example ``endpoints[2].url``) rather than at the top level."""
    return PydanticCustomError(FIELD_PROBLEM, "{message}", {"field": field, "message": message})


def format_validation_error(path: Path, exc: ValidationError) -> ConfigError:
    """One line per problem, each ``<file>: <field>: <message>``, naming the field and never
    echoing the value (it may be a secret)."""
    return ConfigError(
        "\n".join(f"{path}: {field}: {message}" for field, message in field_errors(exc))
    )


def field_errors(exc: ValidationError) -> list[tuple[str, str]]:
    """``(field, message)`` per problem: what the config file's errors and the API's 422
    answers both say."""
    found = []
    for error in exc.errors(include_input=False, include_url=False):
        field = _field_path(error["loc"])
        if error["type"] == FIELD_PROBLEM:
            context = error.get("ctx") or {}
            field = ".".join(part for part in (field, str(context.get("field", ""))) if part)
            field = field.removeprefix("(top level).")
        message = "unknown key" if error["type"] == "extra_forbidden" else error["msg"]
        found.append((field, message.removeprefix("Value error, ")))
    return found


def _field_path(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif part in ("function-after", "function-before") or "[" in str(part):
            continue
        else:
            text += f".{part}" if text else str(part)
    return text or "(top level)"


def load_broker_settings(path: Path, environ: Mapping[str, str] | None = None) -> BrokerSettings:
    """The ``broker`` section alone: what publishing needs."""
    document = read_config_file(path, environ)
    try:
        return BrokerSettings.model_validate(document.get("broker", {}))
    except ValidationError as exc:
        raise _prefixed(path, "broker", exc) from None


def _prefixed(path: Path, section: str, exc: ValidationError) -> ConfigError:
    error = format_validation_error(path, exc)
    prefix = f"{path}: "
    return ConfigError(
        "\n".join(
            f"{prefix}{section}.{line.removeprefix(prefix)}" for line in str(error).splitlines()
        )
    )
