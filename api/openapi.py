"""``/openapi.json``: the OpenAPI 3.1 document, generated from :mod:`api.models`."""

from __future__ import annotations

import functools
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from api import models
from producer import __version__

JSON = "application/json"
NAME = {
    "name": "name",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": "^[a-z0-9][a-z0-9_-]{0,62}$"},
}
ERRORS = {
    "400": "Malformed JSON, query or header",
    "401": "No valid API key",
    "403": "The key may not do this",
    "404": "No such endpoint (or another tenant's)",
    "409": "Name taken, read-only (config) endpoint, or a tenant's limit reached",
    "413": "Body larger than api.max_body_bytes",
    "415": "Not application/json",
    "422": "Invalid values; `errors` names each field",
    "503": "RabbitMQ or PostgreSQL unavailable; nothing was changed",
}


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _body(model: type[BaseModel], required: bool = True) -> dict[str, Any]:
    return {"required": required, "content": {JSON: {"schema": _ref(model)}}}


def _answers(status: str, model: type[BaseModel], description: str, *codes: str) -> dict[str, Any]:
    answers: dict[str, Any] = {
        status: {"description": description, "content": {JSON: {"schema": _ref(model)}}}
    }
    for code in ("401", *codes, "503"):
        answers[code] = {
            "description": ERRORS[code],
            "content": {JSON: {"schema": _ref(models.ErrorBody)}},
        }
    return answers


def _operation(
    summary: str,
    answers: dict[str, Any],
    *,
    body: dict[str, Any] | None = None,
    parameters: list[dict[str, Any]] | None = None,
    secured: bool = True,
) -> dict[str, Any]:
    operation: dict[str, Any] = {"summary": summary, "responses": answers}
    if body is not None:
        operation["requestBody"] = body
    if parameters:
        operation["parameters"] = parameters
    if not secured:
        operation["security"] = []
    return operation


@functools.cache
def openapi_document() -> dict[str, Any]:
    every: list[type[BaseModel]] = [
        models.EndpointCreate,
        models.EndpointPatch,
        models.Endpoint,
        models.EndpointCreated,
        models.EndpointPage,
        models.Deleted,
        models.RotateSecret,
        models.SecretRotated,
        models.SendTestResult,
        models.RecoverRequest,
        models.Recovery,
        models.ErrorBody,
        models.Health,
    ]
    _, schemas = models_json_schema(
        [(model, "validation") for model in every], ref_template="#/components/schemas/{model}"
    )
    endpoint = _answers("200", models.Endpoint, "The endpoint", "404")
    if_match = {
        "name": "If-Match",
        "in": "header",
        "required": False,
        "schema": {"type": "string"},
        "description": "The ETag (version) last read; 412 if the endpoint changed since",
    }
    paths: dict[str, Any] = {
        "/v1/endpoints": {
            "post": _operation(
                "Create an endpoint (its secret is returned once)",
                _answers(
                    "201",
                    models.EndpointCreated,
                    "Created",
                    "400",
                    "403",
                    "409",
                    "413",
                    "415",
                    "422",
                ),
                body=_body(models.EndpointCreate),
            ),
            "get": _operation(
                "List endpoints, by name",
                _answers("200", models.EndpointPage, "A page of endpoints", "400", "403"),
                parameters=[
                    {"name": "tenant", "in": "query", "schema": {"type": "string"}},
                    {"name": "cursor", "in": "query", "schema": {"type": "string"}},
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 1, "maximum": models.MAX_PAGE},
                    },
                ],
            ),
        },
        "/v1/endpoints/{name}": {
            "parameters": [NAME],
            "get": _operation("Read an endpoint", endpoint),
            "patch": _operation(
                "Change an endpoint (fields left out stay; null clears)",
                _answers(
                    "200", models.Endpoint, "Changed", "400", "404", "409", "413", "415", "422"
                )
                | {"412": {"description": "If-Match does not match the version"}},
                body=_body(models.EndpointPatch),
                parameters=[if_match],
            ),
            "delete": _operation(
                "Delete an endpoint (its queued events are kept and counted)",
                _answers("200", models.Deleted, "Deleted", "404", "409"),
            ),
        },
        "/v1/endpoints/{name}/pause": {
            "parameters": [NAME],
            "post": _operation("Pause: events queue, nothing is sent", endpoint),
        },
        "/v1/endpoints/{name}/resume": {
            "parameters": [NAME],
            "post": _operation("Resume: queued events are delivered", endpoint),
        },
        "/v1/endpoints/{name}/secret/rotate": {
            "parameters": [NAME],
            "post": _operation(
                "Rotate the secret; the old one also signs until the grace ends",
                _answers("200", models.SecretRotated, "The new secret", "404", "422"),
                body=_body(models.RotateSecret, required=False),
            ),
        },
        "/v1/endpoints/{name}/test": {
            "parameters": [NAME],
            "post": _operation(
                "Send a signed hookline.test event now and report the answer",
                _answers("200", models.SendTestResult, "What the endpoint answered", "404"),
            ),
        },
        "/v1/endpoints/{name}/recover": {
            "parameters": [NAME],
            "post": _operation(
                "Replay the endpoint's dead letters since a time, paced",
                _answers("202", models.Recovery, "Recovery started", "404", "422"),
                body=_body(models.RecoverRequest),
            ),
        },
        "/v1/recoveries/{id}": {
            "parameters": [
                {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
            ],
            "get": _operation(
                "A recovery's progress", _answers("200", models.Recovery, "The recovery", "404")
            ),
        },
    }
    for path, summary in (
        ("/healthz", "The process answers"),
        ("/readyz", "The database and the broker answer"),
    ):
        paths[path] = {
            "get": _operation(
                summary,
                {
                    "200": {
                        "description": summary,
                        "content": {JSON: {"schema": _ref(models.Health)}},
                    },
                    "503": {
                        "description": "Not ready",
                        "content": {JSON: {"schema": _ref(models.Health)}},
                    },
                },
                secured=False,
            )
        }
    paths["/metrics"] = {
        "get": _operation(
            "Prometheus metrics",
            {
                "200": {
                    "description": "Text exposition format",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                }
            },
            secured=False,
        )
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Hookline registry API",
            "version": __version__,
            "description": "Endpoints as data: see docs/api.md.",
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "schemas": schemas.get("$defs", {}),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
