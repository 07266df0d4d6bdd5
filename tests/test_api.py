"""The registry API against real PostgreSQL and RabbitMQ: the contract, tenants, and bad
input. Each test has its own schema and exchange (the ``api_client`` fixture)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import asyncpg
from openapi_spec_validator import validate

from api import store as api_store
from api.metrics import ApiMetrics
from api.server import ApiServer
from tests.conftest import (
    ApiClient,
    Broker,
    Receiver,
    eventually,
    make_settings,
    registry_sections,
)
from tests.faults import TcpProxy
from tests.helpers import dead_letter_event
from worker.signing import SigningKey
from worker.topology import endpoint_queue


def new_endpoint(name: str, url: str = "http://127.0.0.1:9/hook", **extra: Any) -> dict[str, Any]:
    return {"name": name, "url": url, "events": ["order.*"], **extra}


async def bindings_of(broker: Broker, exchange: str, name: str) -> bool:
    """Whether an event of type order.created published now reaches the endpoint's queue."""
    channel = await broker.channel()
    try:
        queue = await channel.declare_queue(endpoint_queue(exchange, name), passive=True)
        before = queue.declaration_result.message_count
    finally:
        await channel.close()
    await broker.publish(exchange, "order.created", b"{}")
    channel = await broker.channel()
    try:
        queue = await channel.declare_queue(endpoint_queue(exchange, name), passive=True)
        return bool(queue.declaration_result.message_count > before)
    finally:
        await channel.close()


async def test_create_returns_the_secret_once_and_declares_the_queue(
    api_client: ApiClient, broker: Broker
) -> None:
    """201 with a whsec_ secret that parses; GET never shows it; the queue exists and is
    bound before the answer, so an event published at once is queued for it."""
    created = await api_client.call("POST", "/v1/endpoints", new_endpoint("orders"))
    assert created.status == 201, created.body
    SigningKey.parse(created.body["secret"])
    assert created.headers["Location"] == "/v1/endpoints/orders"
    assert created.body["source"] == "api"
    assert created.body["version"] == 1
    exchange = api_client.server.settings.broker.exchange
    assert await bindings_of(broker, exchange, "orders")
    read = await api_client.call("GET", "/v1/endpoints/orders")
    assert read.status == 200
    assert "secret" not in read.body
    assert created.body["secret"] not in json.dumps(read.body)
    assert read.headers["ETag"] == '"1"'


async def test_requests_without_a_valid_key_are_refused(api_client: ApiClient) -> None:
    """401 with WWW-Authenticate for no key, a malformed key, an unknown key and a
    revoked one; the open routes need none."""
    for key in (None, "nonsense", "hlk_000000000000_" + "A" * 43):
        answer = await api_client.call("GET", "/v1/endpoints", key=key)
        assert answer.status == 401, key
        assert answer.body["error"]["code"] == "unauthorized"
        assert answer.headers["WWW-Authenticate"].startswith("Bearer")
    for path in ("/healthz", "/readyz", "/openapi.json", "/metrics"):
        assert (await api_client.call("GET", path, key=None)).status == 200, path


async def test_validation_names_the_field_with_the_config_files_messages(
    api_client: ApiClient,
) -> None:
    """Bad values answer 422 naming each field, worded as the config file's errors."""
    cases = {
        "name": new_endpoint("Bad Name!"),
        "url": new_endpoint("x1", url="ftp://example.com/"),
        "events": new_endpoint("x2", events=["order..created"]),
        "headers": new_endpoint("x3", headers={"webhook-id": "forged"}),
        "timeout_s": new_endpoint("x4", timeout_s=5000),
        "tenant": new_endpoint("x5", tenant="no spaces"),
        "filter": new_endpoint("x6", filter={"$bogus": 1}),
    }
    for field, document in cases.items():
        answer = await api_client.call("POST", "/v1/endpoints", document)
        assert answer.status == 422, (field, answer.body)
        fields = [error["field"] for error in answer.body["error"]["errors"]]
        assert any(name.startswith(field) for name in fields), (field, fields)


async def test_https_and_ssrf_rules_apply_as_in_the_config_file(
    api_client: ApiClient,
) -> None:
    """With security.require_https on, an http:// URL is refused with the config file's
    message; credentials in the URL are refused whatever the settings."""
    settings = api_client.server.settings
    strict = settings.model_copy(
        update={"security": settings.security.model_copy(update={"require_https": True})}
    )
    assert api_client.server.api is not None
    api_client.server.api.settings = strict
    answer = await api_client.call("POST", "/v1/endpoints", new_endpoint("plain"))
    assert answer.status == 422
    assert answer.body["error"]["errors"] == [
        {
            "field": "url",
            "message": "http:// URLs are refused while security.require_https is true",
        }
    ]
    answer = await api_client.call(
        "POST", "/v1/endpoints", new_endpoint("creds", url="https://user:pw@example.com/")
    )
    assert answer.status == 422
    assert "credentials" in answer.body["error"]["errors"][0]["message"]


async def test_bad_bodies_get_a_clear_4xx(api_client: ApiClient) -> None:
    """Malformed JSON 400, not an object 400, duplicate keys 400, NaN 400, wrong types and
    unknown fields 422, a wrong content type 415, an oversized body 413."""
    json_headers = {"Content-Type": "application/json"}
    cases: list[tuple[bytes, dict[str, str], int]] = [
        (b"{", json_headers, 400),
        (b"[1]", json_headers, 400),
        (b'{"name": "a", "name": "b"}', json_headers, 400),
        (
            b'{"name": "a", "url": "http://x/", "events": ["a"], "timeout_s": NaN}',
            json_headers,
            400,
        ),
        (json.dumps({**new_endpoint("a"), "timeout_s": "10"}).encode(), json_headers, 422),
        (json.dumps({**new_endpoint("a"), "secret": "whsec_x"}).encode(), json_headers, 422),
        (json.dumps(new_endpoint("a")).encode(), {"Content-Type": "text/plain"}, 415),
        (b'{"name": "' + b"a" * 200_000 + b'"}', json_headers, 413),
    ]
    for raw, sent, status in cases:
        answer = await api_client.call("POST", "/v1/endpoints", raw=raw, headers=sent)
        assert answer.status == status, (raw[:60], answer.status, answer.body)
        assert set(answer.body) == {"error"}
    listed = await api_client.call("GET", "/v1/endpoints")
    assert listed.body["data"] == []


async def test_hostile_names_are_refused_and_change_nothing(api_client: ApiClient) -> None:
    """SQL-looking and non-ASCII names fail validation (422); a path with them is a 404;
    the table is intact afterwards."""
    for name in (
        "a'; DROP TABLE endpoints; --",
        "naïve",
        "\uff46\uff55\uff4c\uff4c",
        "a" * 64,
        "",
        "../etc",
    ):
        answer = await api_client.call("POST", "/v1/endpoints", new_endpoint(name))
        assert answer.status == 422, name
    for path in ("/v1/endpoints/a'%3B%20DROP%20TABLE%20endpoints", "/v1/endpoints/na%C3%AFve"):
        assert (await api_client.call("GET", path)).status == 404
    assert (await api_client.call("POST", "/v1/endpoints", new_endpoint("fine"))).status == 201
    assert [e["name"] for e in (await api_client.call("GET", "/v1/endpoints")).body["data"]] == [
        "fine"
    ]


async def test_names_are_unique(api_client: ApiClient) -> None:
    """A second create with the same name is 409 name_taken."""
    assert (await api_client.call("POST", "/v1/endpoints", new_endpoint("dup"))).status == 201
    again = await api_client.call("POST", "/v1/endpoints", new_endpoint("dup"))
    assert again.status == 409
    assert again.body["error"]["code"] == "name_taken"


async def test_tenant_keys_see_and_change_only_their_tenant(api_client: ApiClient) -> None:
    """A tenant key creates in its tenant, cannot name another (403), gets 404 for the
    other tenant's endpoints on every route, and lists only its own."""
    acme = await api_client.create_key(tenant="acme")
    globex = await api_client.create_key(tenant="globex")
    mine = await api_client.call(
        "POST", "/v1/endpoints", new_endpoint("acme-1", events=["acme.order.*"]), key=acme
    )
    assert mine.status == 201
    assert mine.body["tenant"] == "acme"
    forbidden = await api_client.call(
        "POST",
        "/v1/endpoints",
        new_endpoint("acme-2", tenant="globex", events=["globex.#"]),
        key=acme,
    )
    assert forbidden.status == 403
    for method, path, body in (
        ("GET", "/v1/endpoints/acme-1", None),
        ("PATCH", "/v1/endpoints/acme-1", {"description": "mine now"}),
        ("PATCH", "/v1/endpoints/acme-1", {"events": ["globex.#"]}),
        ("DELETE", "/v1/endpoints/acme-1", None),
        ("POST", "/v1/endpoints/acme-1/pause", None),
        ("POST", "/v1/endpoints/acme-1/secret/rotate", None),
        ("POST", "/v1/endpoints/acme-1/test", None),
        ("POST", "/v1/endpoints/acme-1/recover", {"since": "2026-01-01T00:00:00Z"}),
    ):
        answer = await api_client.call(method, path, body, key=globex)
        assert answer.status == 404, (method, path, answer.body)
        assert "acme" not in json.dumps(answer.body).replace("acme-1", "")
    assert (await api_client.call("GET", "/v1/endpoints", key=globex)).body["data"] == []
    assert (await api_client.call("GET", "/v1/endpoints?tenant=acme", key=globex)).status == 403
    listed = await api_client.call("GET", "/v1/endpoints", key=acme)
    assert [e["name"] for e in listed.body["data"]] == ["acme-1"]
    assert (await api_client.call("GET", "/v1/endpoints/acme-1")).status == 200  # admin


async def test_list_pages_with_a_cursor(api_client: ApiClient) -> None:
    """25 endpoints in pages of 10: every name once, in order, and the last page has no
    cursor; a forged cursor is 400."""
    for n in range(25):
        assert (
            await api_client.call("POST", "/v1/endpoints", new_endpoint(f"page-{n:02d}"))
        ).status == 201
    seen: list[str] = []
    cursor = None
    while True:
        query = "/v1/endpoints?limit=10" + (f"&cursor={cursor}" if cursor else "")
        page = await api_client.call("GET", query)
        assert page.status == 200
        seen += [endpoint["name"] for endpoint in page.body["data"]]
        cursor = page.body["next_cursor"]
        if cursor is None:
            break
    assert seen == [f"page-{n:02d}" for n in range(25)]
    assert (await api_client.call("GET", "/v1/endpoints?cursor=%%%")).status == 400
    assert (await api_client.call("GET", "/v1/endpoints?limit=0")).status == 400


async def test_patch_changes_bindings_and_checks_the_version(
    api_client: ApiClient, broker: Broker
) -> None:
    """PATCH events rebinds the queue before answering; If-Match with an old version is
    412; null clears an optional field but not a required one."""
    exchange = api_client.server.settings.broker.exchange
    await api_client.call("POST", "/v1/endpoints", new_endpoint("p", events=["invoice.*"]))
    assert not await bindings_of(broker, exchange, "p")
    changed = await api_client.call(
        "PATCH",
        "/v1/endpoints/p",
        {"events": ["order.*"], "timeout_s": 3},
        headers={"If-Match": '"1"'},
    )
    assert changed.status == 200, changed.body
    assert changed.body["version"] == 2
    assert await bindings_of(broker, exchange, "p")
    stale = await api_client.call(
        "PATCH", "/v1/endpoints/p", {"description": "x"}, headers={"If-Match": '"1"'}
    )
    assert stale.status == 412
    cleared = await api_client.call("PATCH", "/v1/endpoints/p", {"timeout_s": None})
    assert cleared.body["timeout_s"] is None
    refused = await api_client.call("PATCH", "/v1/endpoints/p", {"url": None})
    assert refused.status == 422
    assert (await api_client.call("PATCH", "/v1/endpoints/p", {"name": "q"})).status == 422


async def test_concurrent_patches_are_serialised_and_the_last_write_wins(
    api_client: ApiClient,
) -> None:
    """Twenty PATCHes of one endpoint at once all succeed, each bumps the version once,
    and the endpoint ends as one of them left it."""
    await api_client.call("POST", "/v1/endpoints", new_endpoint("busy"))
    answers = await asyncio.gather(
        *(
            api_client.call("PATCH", "/v1/endpoints/busy", {"description": f"writer {n}"})
            for n in range(20)
        )
    )
    assert all(answer.status == 200 for answer in answers)
    assert sorted(answer.body["version"] for answer in answers) == list(range(2, 22))
    final = await api_client.call("GET", "/v1/endpoints/busy")
    last = max(answers, key=lambda answer: answer.body["version"])
    assert final.body["description"] == last.body["description"]


async def test_delete_unbinds_and_reports_what_is_queued(
    api_client: ApiClient, broker: Broker
) -> None:
    """DELETE unbinds first (no new events queue up) and reports the events left, which
    stay in the queue; re-creating the name is refused while they are there."""
    exchange = api_client.server.settings.broker.exchange
    await api_client.call("POST", "/v1/endpoints", new_endpoint("gone"))
    await broker.publish(exchange, "order.created", b"{}")
    await broker.publish(exchange, "order.created", b"{}")
    deleted = await api_client.call("DELETE", "/v1/endpoints/gone")
    assert deleted.status == 200
    assert deleted.body == {"name": "gone", "deleted": True, "queued": 2}
    await broker.publish(exchange, "order.created", b"{}")
    assert await broker.depth(endpoint_queue(exchange, "gone")) == 2
    assert (await api_client.call("GET", "/v1/endpoints/gone")).status == 404
    again = await api_client.call("POST", "/v1/endpoints", new_endpoint("gone"))
    assert again.status == 409
    assert again.body["error"]["code"] == "name_has_queued_events"
    await broker.drain(endpoint_queue(exchange, "gone"))
    assert (await api_client.call("POST", "/v1/endpoints", new_endpoint("gone"))).status == 201


async def test_rotate_returns_a_new_secret_and_keeps_the_old_for_the_grace(
    api_client: ApiClient,
) -> None:
    """Rotation answers a new secret; during the grace two secrets sign; grace 0 leaves
    only the new one."""
    first = await api_client.call("POST", "/v1/endpoints", new_endpoint("rot"))
    rotated = await api_client.call("POST", "/v1/endpoints/rot/secret/rotate", {"grace_s": 3600})
    assert rotated.status == 200, rotated.body
    assert rotated.body["secret"] != first.body["secret"]
    assert rotated.body["previous_secret_expires_at"] is not None
    read = await api_client.call("GET", "/v1/endpoints/rot")
    assert read.body["signing_secrets"] == 2
    await api_client.call("POST", "/v1/endpoints/rot/secret/rotate", {"grace_s": 0})
    assert (await api_client.call("GET", "/v1/endpoints/rot")).body["signing_secrets"] == 1
    default = await api_client.call("POST", "/v1/endpoints/rot/secret/rotate")
    assert default.status == 200
    bad = await api_client.call("POST", "/v1/endpoints/rot/secret/rotate", {"grace_s": -1})
    assert bad.status == 422


async def test_send_test_reports_what_the_endpoint_answered(
    api_client: ApiClient, receiver: Receiver
) -> None:
    """POST /test sends a signed hookline.test event now and reports the status."""
    created = await api_client.call(
        "POST", "/v1/endpoints", new_endpoint("t", url=f"{receiver.base_url}/t")
    )
    answer = await api_client.call("POST", "/v1/endpoints/t/test")
    assert answer.status == 200, answer.body
    assert answer.body["delivered"] is True
    assert answer.body["status"] == 200
    request = receiver.requests[-1]
    key = SigningKey.parse(created.body["secret"])
    signed = f"{request.headers['webhook-id']}.{request.headers['webhook-timestamp']}.".encode()
    assert request.headers["webhook-signature"] == key.signature(signed + request.body)


async def test_paused_endpoints_answer_paused(api_client: ApiClient) -> None:
    """pause and resume flip `paused` and bump the version; doing it twice is harmless."""
    await api_client.call("POST", "/v1/endpoints", new_endpoint("pz"))
    paused = await api_client.call("POST", "/v1/endpoints/pz/pause")
    assert paused.body["paused"] is True
    again = await api_client.call("POST", "/v1/endpoints/pz/pause")
    assert again.body["version"] == paused.body["version"]
    resumed = await api_client.call("POST", "/v1/endpoints/pz/resume")
    assert resumed.body["paused"] is False


async def test_a_thousand_parallel_creates_leave_nothing_half_created(
    api_client: ApiClient, broker: Broker
) -> None:
    """1,000 creates at once (some names twice): each answers 201 or 409, every 201 has
    its queue, and no queue exists without its row."""
    names = [f"bulk-{n % 900:04d}" for n in range(1000)]
    answers = await asyncio.gather(
        *(api_client.call("POST", "/v1/endpoints", new_endpoint(name)) for name in names)
    )
    statuses = sorted({answer.status for answer in answers})
    assert set(statuses) <= {201, 409}, statuses
    created = {answer.body["name"] for answer in answers if answer.status == 201}
    assert created == set(names)
    exchange = api_client.server.settings.broker.exchange
    channel = await broker.channel()
    try:
        for name in sorted(created)[::50]:
            await channel.declare_queue(endpoint_queue(exchange, name), passive=True)
    finally:
        await channel.close()
    listed: list[str] = []
    query = "/v1/endpoints?limit=500"
    while True:
        page = await api_client.call("GET", query)
        listed += [endpoint["name"] for endpoint in page.body["data"]]
        if page.body["next_cursor"] is None:
            break
        query = f"/v1/endpoints?limit=500&cursor={page.body['next_cursor']}"
    assert sorted(listed) == sorted(created)


async def test_tenant_endpoint_limit_holds_under_parallel_creates(
    api_client: ApiClient,
) -> None:
    """With max_endpoints_per_tenant 5, 20 parallel creates give exactly 5 endpoints."""
    settings = api_client.server.settings
    assert api_client.server.api is not None
    api_client.server.api.settings = settings.model_copy(
        update={"registry": settings.registry.model_copy(update={"max_endpoints_per_tenant": 5})}
    )
    answers = await asyncio.gather(
        *(
            api_client.call("POST", "/v1/endpoints", new_endpoint(f"lim-{n}", tenant="small"))
            for n in range(20)
        )
    )
    assert sorted(answer.status for answer in answers) == [201] * 5 + [409] * 15
    assert {answer.body["error"]["code"] for answer in answers if answer.status == 409} == {
        "tenant_endpoint_limit"
    }


async def test_openapi_document_is_valid_openapi_31(api_client: ApiClient) -> None:
    """/openapi.json passes a real OpenAPI 3.1 validator and lists every route."""
    document = (await api_client.call("GET", "/openapi.json", key=None)).body
    validate(document)
    assert document["openapi"] == "3.1.0"
    for path in (
        "/v1/endpoints",
        "/v1/endpoints/{name}",
        "/v1/endpoints/{name}/pause",
        "/v1/endpoints/{name}/resume",
        "/v1/endpoints/{name}/secret/rotate",
        "/v1/endpoints/{name}/test",
        "/v1/endpoints/{name}/recover",
    ):
        assert path in document["paths"], path


async def test_metrics_count_requests_by_route_template(api_client: ApiClient) -> None:
    """Requests are counted by route template, never by the name in the path."""
    await api_client.call("GET", "/v1/endpoints/some-name")
    registry = api_client.server.metrics.registry
    value = registry.get_sample_value(
        "webhook_api_requests_total",
        {"method": "GET", "route": "/v1/endpoints/{name}", "status": "404"},
    )
    assert value == 1
    text = (await api_client.call("GET", "/metrics", key=None)).body
    assert b"some-name" not in text


async def test_recover_replays_the_endpoints_dead_letters_since_a_time(
    api_client: ApiClient, broker: Broker
) -> None:
    """recover answers 202 with a recovery, replays the endpoint's dead letters since the
    time given into its queue, and the recovery ends `finished` with the count."""
    exchange = api_client.server.settings.broker.exchange
    await api_client.call("POST", "/v1/endpoints", new_endpoint("rec"))
    for n, target in enumerate(("rec", "rec", "rec", "other")):
        await dead_letter_event(broker, exchange, target, f"evt-{n}")
    answer = await api_client.call(
        "POST", "/v1/endpoints/rec/recover", {"since": "2000-01-01T00:00:00Z", "rate_per_s": 100}
    )
    assert answer.status == 202, answer.body
    recovery = answer.headers["Location"]

    async def finished() -> bool:
        state = await api_client.call("GET", recovery)
        return bool(state.body["status"] == "finished")

    await eventually(finished)
    assert (await api_client.call("GET", recovery)).body["replayed"] == 3
    assert await broker.depth(endpoint_queue(exchange, "rec")) == 3


async def test_a_tenant_key_subscribes_only_to_its_own_event_types(
    api_client: ApiClient,
) -> None:
    """With registry.tenant_events "prefixed" (the default), a tenant key's patterns must
    start with its tenant's word, on create and on PATCH; an admin key may use any."""
    acme = await api_client.create_key(tenant="acme")
    for events in (["#"], ["*.order.created"], ["order.*"], ["acmeX.#"], ["acme.#", "globex.#"]):
        answer = await api_client.call(
            "POST", "/v1/endpoints", new_endpoint("sub", events=events), key=acme
        )
        assert answer.status == 422, events
        assert answer.body["error"]["errors"][0]["field"] == "events"
    ok = await api_client.call(
        "POST", "/v1/endpoints", new_endpoint("sub", events=["acme.#", "acme.*.created"]), key=acme
    )
    assert ok.status == 201, ok.body
    widened = await api_client.call("PATCH", "/v1/endpoints/sub", {"events": ["#"]}, key=acme)
    assert widened.status == 422
    assert (await api_client.call("PATCH", "/v1/endpoints/sub", {"events": ["#"]})).status == 200
    dotted = await api_client.create_key(tenant="acme.eu")
    refused = await api_client.call(
        "POST", "/v1/endpoints", new_endpoint("eu", events=["acme.eu.#"]), key=dotted
    )
    assert refused.status == 403


async def test_a_deleted_name_stays_with_its_tenant(api_client: ApiClient) -> None:
    """After acme deletes an endpoint, globex cannot take its name (409 name_taken, as for
    a live one); acme can, and so can an admin."""
    acme = await api_client.create_key(tenant="acme")
    globex = await api_client.create_key(tenant="globex")
    spec = new_endpoint("shared", events=["acme.#"])
    assert (await api_client.call("POST", "/v1/endpoints", spec, key=acme)).status == 201
    assert (await api_client.call("DELETE", "/v1/endpoints/shared", key=acme)).status == 200
    taken = await api_client.call(
        "POST", "/v1/endpoints", new_endpoint("shared", events=["globex.#"]), key=globex
    )
    assert taken.status == 409
    assert taken.body["error"]["code"] == "name_taken"
    assert (await api_client.call("POST", "/v1/endpoints", spec, key=acme)).status == 201


async def test_tenant_events_any_lets_a_tenant_key_subscribe_to_every_type(
    api_client: ApiClient,
) -> None:
    """With registry.tenant_events "any" (tenants that are teams, not customers), a tenant
    key may subscribe to any type."""
    settings = api_client.server.settings
    assert api_client.server.api is not None
    api_client.server.api.settings = settings.model_copy(
        update={"registry": settings.registry.model_copy(update={"tenant_events": "any"})}
    )
    team = await api_client.create_key(tenant="payments")
    answer = await api_client.call(
        "POST", "/v1/endpoints", new_endpoint("team", events=["#"]), key=team
    )
    assert answer.status == 201, answer.body


async def test_the_same_tenant_recovers_what_it_retired_under_a_name_it_re_creates(
    api_client: ApiClient, broker: Broker
) -> None:
    """A tenant deletes an endpoint, its dead letters stay; it re-creates the name and
    recovers them. Had an admin given the name to another tenant, that tenant's recovery
    would start at the hand-over."""
    acme = await api_client.create_key(tenant="acme")
    spec = new_endpoint("again", events=["acme.#"])
    exchange = api_client.server.settings.broker.exchange
    assert (await api_client.call("POST", "/v1/endpoints", spec, key=acme)).status == 201
    await dead_letter_event(broker, exchange, "again", "evt-old", "acme.order.created")
    assert (await api_client.call("DELETE", "/v1/endpoints/again", key=acme)).status == 200
    assert (await api_client.call("POST", "/v1/endpoints", spec, key=acme)).status == 201
    started = await api_client.call(
        "POST", "/v1/endpoints/again/recover", {"since": "2000-01-01T00:00:00Z"}, key=acme
    )
    assert started.status == 202, started.body

    async def finished() -> bool:
        state = await api_client.call("GET", started.headers["Location"], key=acme)
        return bool(state.body["status"] == "finished")

    await eventually(finished)
    state = await api_client.call("GET", started.headers["Location"], key=acme)
    assert state.body["replayed"] == 1


async def test_the_api_listens_before_rabbitmq_answers(
    registry_db: str, exchange_name: str, proxy: TcpProxy, broker: Broker
) -> None:
    """Started while RabbitMQ refuses connections, the API answers /healthz, says in
    /readyz that the broker is not there, answers writes 503, and becomes ready once
    RabbitMQ answers."""
    proxy.refusing = True
    settings = make_settings(
        exchange_name,
        [],
        **registry_sections(registry_db),
        broker={"url": f"amqp://guest:guest@127.0.0.1:{proxy.port}/", "queue_type": "classic"},
    )
    server = ApiServer(settings, ApiMetrics())
    await server.start()
    client = ApiClient(server, await _admin_key(registry_db), registry_db)
    try:
        assert (await client.call("GET", "/healthz", key=None)).status == 200
        ready = await client.call("GET", "/readyz", key=None)
        assert ready.status == 503
        assert ready.body["detail"] == {"broker": False, "database": True}
        created = await client.call("POST", "/v1/endpoints", new_endpoint("early"))
        assert created.status == 503
        assert created.body["error"]["code"] == "broker_unavailable"
        proxy.refusing = False
        await asyncio.wait_for(server.broker_connected(), 30)
        assert (await client.call("GET", "/readyz", key=None)).status == 200
    finally:
        await client.session.close()
        await server.stop()
        await broker.delete_all(settings)


async def _admin_key(database_url: str) -> str:
    connection = await asyncpg.connect(database_url)
    try:
        key = await api_store.create_key(connection, admin=True, tenant=None, description="t")
    finally:
        await connection.close()
    return key.token


async def test_a_recovery_never_reaches_before_the_endpoint_existed(
    api_client: ApiClient, broker: Broker
) -> None:
    """Dead letters left under a name before the endpoint was created (by a config-file
    endpoint since removed, say) are not the new endpoint's to recover."""
    exchange = api_client.server.settings.broker.exchange
    await dead_letter_event(broker, exchange, "fresh", "evt-before")
    await asyncio.sleep(0.05)
    assert (await api_client.call("POST", "/v1/endpoints", new_endpoint("fresh"))).status == 201
    started = await api_client.call(
        "POST", "/v1/endpoints/fresh/recover", {"since": "2000-01-01T00:00:00Z"}
    )
    assert started.status == 202

    async def finished() -> bool:
        state = await api_client.call("GET", started.headers["Location"])
        return bool(state.body["status"] == "finished")

    await eventually(finished)
    state = await api_client.call("GET", started.headers["Location"])
    assert state.body["replayed"] == 0
    assert state.body["since"] > "2000-01-02"
