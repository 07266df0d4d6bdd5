"""What the API takes and gives: pydantic models, which also generate ``/openapi.json``.

Request models check shape and types (unknown fields, a string where a number belongs);
what an endpoint's values may be is checked by :class:`worker.settings.EndpointSettings`,
the same model as the config file's, so the rules and messages are the same.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator

MAX_GRACE_S = 30 * 24 * 3600
# Times a recovery may name: what PostgreSQL and every client can represent.
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(9999, 1, 1, tzinfo=UTC)
MAX_PAGE = 500
DEFAULT_PAGE = 100


class Request(BaseModel):
    # Strict: "10" is not a number, 1 is not a boolean.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Response(BaseModel):
    model_config = ConfigDict(frozen=True)


class EndpointCreate(Request):
    """A new endpoint. Its signing secret is generated and returned once."""

    name: str = Field(description="Unique; [a-z0-9][a-z0-9_-]{0,62}. Names the queue.")
    url: str = Field(description="https:// (http:// only if security.require_https is off)")
    events: list[str] = Field(description="Topic patterns: dot-separated words, '*' or '#'")
    tenant: str | None = Field(default=None, description="Opaque label; a tenant key sets it")
    filter: dict[str, Any] | None = Field(default=None, description="See docs/filters.md")
    headers: dict[str, str] = Field(
        default_factory=dict, description="Sent with every request; values are write-only"
    )
    timeout_s: float | None = None
    max_in_flight: int | None = None
    rate_limit_per_s: float | None = None
    description: str | None = None
    metrics_detail: bool = False
    paused: bool = False


class EndpointPatch(Request):
    """Fields to change; a field left out stays as it is, null clears an optional one.
    ``headers`` replaces the whole set (values are write-only, so send every one)."""

    url: str | None = None
    events: list[str] | None = None
    filter: dict[str, Any] | None = None
    headers: dict[str, str] | None = None
    timeout_s: float | None = None
    max_in_flight: int | None = None
    rate_limit_per_s: float | None = None
    description: str | None = None
    metrics_detail: bool | None = None


class Endpoint(Response):
    name: str
    url: str = Field(description="Query values masked (they may hold tokens)")
    events: list[str]
    tenant: str | None
    filter: dict[str, Any] | None
    headers: dict[str, str] = Field(description="Names only: every value reads ****")
    timeout_s: float | None
    max_in_flight: int | None
    rate_limit_per_s: float | None
    description: str | None
    metrics_detail: bool
    paused: bool
    source: Literal["api", "config"] = Field(description="config endpoints are read-only")
    version: int | None = Field(description="Bumped by every change; send it as If-Match")
    signing_secrets: int = Field(description="Secrets signing now (2 during a rotation)")
    previous_secret_expires_at: datetime | None
    created_at: datetime | None
    updated_at: datetime | None


class EndpointCreated(Endpoint):
    secret: str = Field(description="whsec_...: returned here and by rotate only")


class EndpointPage(Response):
    data: list[Endpoint]
    next_cursor: str | None = Field(description="Pass as ?cursor= for the next page")


class Deleted(Response):
    name: str
    deleted: Literal[True] = True
    queued: int | None = Field(
        description="Events left in its queue, which are kept: an operator moves them to the "
        "dead-letter queue with `python -m worker dlq retire --endpoint NAME`; re-create the "
        "endpoint and recover them to deliver them"
    )


class RotateSecret(Request):
    grace_s: float = Field(default=86400.0, ge=0, le=MAX_GRACE_S)


class SecretRotated(Response):
    name: str
    secret: str
    previous_secret_expires_at: datetime | None


class SendTestResult(Response):
    event_id: str
    delivered: bool
    status: int | None
    error: str | None
    duration_ms: float
    detail: str


class RecoverRequest(Request):
    since: AwareDatetime = Field(
        description="Dead letters dead-lettered at or after this time (with its UTC offset)"
    )
    until: AwareDatetime | None = None
    rate_per_s: float | None = Field(
        default=None, ge=1, le=10_000, strict=True, description="Replays per second (default 50)"
    )

    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)

    @model_validator(mode="after")
    def _check_window(self) -> RecoverRequest:
        for moment in (self.since, self.until):
            if moment is not None and not EARLIEST <= moment <= LATEST:
                raise ValueError("times must be between 1970 and 9999")
        if self.until is not None and self.until < self.since:
            raise ValueError("until must not be before since")
        return self


class Recovery(Response):
    id: str
    endpoint: str
    since: datetime
    until: datetime | None
    rate_per_s: float | None
    status: Literal["running", "finished", "failed"]
    replayed: int
    error: str | None
    created_at: datetime
    heartbeat_at: datetime = Field(description="Written every 2 s while it runs")
    finished_at: datetime | None


class FieldError(Response):
    field: str
    message: str


class ErrorDetail(Response):
    code: str
    message: str
    errors: list[FieldError] | None = None


class ErrorBody(Response):
    error: ErrorDetail


class Health(Response):
    status: str
    detail: dict[str, Any] | None = None
