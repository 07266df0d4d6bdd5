"""The registry API against a hostile or careless client: authentication, tenant isolation,
injection, SSRF, resource limits, odd JSON, and what answers and logs may reveal.

Real PostgreSQL and RabbitMQ (the ``api_client`` fixture), no mocks. Each test is an
attack that was tried; fourteen of them found holes (tenants reusing names, subscribing to
every event or stalling the dead-letter queue; values PostgreSQL cannot store; unbounded
bindings; credentials in answers) that the API now closes.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import asyncpg
import structlog
from pydantic import SecretStr

from api import store as api_store
from api.models import MAX_GRACE_S
from tests.conftest import SECRET_KEY, ApiClient, Broker, Receiver
from tests.helpers import dead_letter_event
from worker.secretbox import SecretBox
from worker.topology import endpoint_queue

JSON = {"Content-Type": "application/json"}
SINCE_2000 = {"since": "2000-01-01T00:00:00Z"}


def new_endpoint(name: str, url: str = "http://127.0.0.1:9/hook", **extra: Any) -> dict[str, Any]:
    return {"name": name, "url": url, "events": ["order.*"], **extra}


def raw_json(document: Any) -> bytes:
    """``document`` as JSON bytes, lone surrogates written as ``\\udXXX`` escapes."""
    return json.dumps(document).encode()


def exchange_of(api_client: ApiClient) -> str:
    return api_client.server.settings.broker.exchange


async def dead_letter(broker: Broker, exchange: str, endpoint: str, payload: str) -> None:
    """A dead letter of ``endpoint`` whose id holds ``payload``, dead-lettered now."""
    await dead_letter_event(broker, exchange, endpoint, f"evt-{payload}")


async def wait_recovery(api_client: ApiClient, location: str, key: str = "admin") -> Any:
    """The recovery once it is no longer running (or as it is after 10 s)."""
    deadline = time.monotonic() + 10
    while True:
        state = await api_client.call("GET", location, key=key)
        if state.body["status"] != "running" or time.monotonic() > deadline:
            return state.body
        await asyncio.sleep(0.05)


async def sql(api_client: ApiClient, statement: str, *args: Any) -> None:
    """Run ``statement`` as an operator would, behind the API's back (jsonb as text)."""
    connection = await asyncpg.connect(api_client.database_url)
    try:
        await connection.execute(statement, *args)
    finally:
        await connection.close()


def use_settings(api_client: ApiClient, **sections: Any) -> None:
    """Swap sections of the running API's settings (as the strict-HTTPS test does)."""
    api = api_client.server.api
    assert api is not None
    settings = api_client.server.settings
    api.settings = settings.model_copy(
        update={
            name: getattr(settings, name).model_copy(update=values)
            for name, values in sections.items()
        }
    )


@contextmanager
def rendered_logs() -> Iterator[list[str]]:
    """Every log event of the block, rendered as the production JSON renderer would
    (tracebacks as dicts without frame locals)."""
    lines: list[str] = []
    render = structlog.processors.ExceptionRenderer(
        structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
    )
    with structlog.testing.capture_logs() as captured:
        yield lines
    for event in captured:
        lines.append(json.dumps(render(None, "", dict(event)), default=str))


# -- authentication ----------------------------------------------------------------------


async def test_odd_authorization_headers_are_refused_and_odd_spacing_is_harmless(
    api_client: ApiClient,
) -> None:
    """The scheme is case-insensitive and stray spaces are trimmed; anything else (another
    scheme, no scheme, a key in the query, a tab, a trailing newline, a key id with another
    key's secret, a revoked key) is 401."""
    admin = api_client.admin_key
    for accepted in (f"bearer {admin}", f"BEARER {admin}", f"Bearer   {admin}  "):
        answer = await api_client.call(
            "GET", "/v1/endpoints", key=None, headers={"Authorization": accepted}
        )
        assert answer.status == 200, accepted
    other = await api_client.create_key(tenant="other")
    admin_id = admin.split("_")[1]
    forged = f"hlk_{admin_id}_{other.split('_', 2)[2]}"
    refused = [
        f"Basic {admin}",
        admin,
        f"Bearer\t{admin}",
        f"Bearer {admin}x",
        f"Bearer {admin[:-1]}",
        f"Bearer {forged}",
        f"Bearer {admin.upper()}",
        "Bearer ",
        "Bearer",
    ]
    for header in refused:
        answer = await api_client.call(
            "GET", "/v1/endpoints", key=None, headers={"Authorization": header}
        )
        assert answer.status == 401, header
    in_query = await api_client.call("GET", f"/v1/endpoints?access_token={admin}", key=None)
    assert in_query.status == 401
    revoked = await api_client.create_key(admin=True)
    assert (await api_client.call("GET", "/v1/endpoints", key=revoked)).status == 200
    connection = await asyncpg.connect(api_client.database_url)
    try:
        assert await api_store.revoke_key(connection, revoked.split("_")[1])
    finally:
        await connection.close()
    assert (await api_client.call("GET", "/v1/endpoints", key=revoked)).status == 401
    # Unknown paths answer 401 before 404, so they reveal no routes either.
    assert (await api_client.call("GET", "/v1/secret-admin", key=None)).status == 401


# -- tenant isolation --------------------------------------------------------------------


async def test_recover_never_replays_a_previous_owners_dead_letters(
    api_client: ApiClient, broker: Broker
) -> None:
    """Endpoint names are global and free again after a delete. acme's endpoint
    ``shared`` dead-letters an event and is deleted; globex creates ``shared`` and asks
    for a recovery: acme's event must not be replayed into globex's queue."""
    exchange = exchange_of(api_client)
    acme = await api_client.create_key(tenant="acme")
    globex = await api_client.create_key(tenant="globex")
    assert (
        await api_client.call(
            "POST", "/v1/endpoints", new_endpoint("shared", events=["acme.order.*"]), key=acme
        )
    ).status == 201
    await dead_letter(broker, exchange, "shared", "acme-private-order")
    deleted = await api_client.call("DELETE", "/v1/endpoints/shared", key=acme)
    assert deleted.body["queued"] == 0
    # The name stays acme's: globex is told it is taken, as for a live endpoint.
    refused = await api_client.call(
        "POST", "/v1/endpoints", new_endpoint("shared", events=["globex.order.*"]), key=globex
    )
    assert refused.status == 409
    # An admin may still give the name to globex: a recovery then starts at its creation.
    assert (
        await api_client.call(
            "POST", "/v1/endpoints", new_endpoint("shared", tenant="globex", events=["globex.#"])
        )
    ).status == 201
    started = await api_client.call("POST", "/v1/endpoints/shared/recover", SINCE_2000, key=globex)
    assert started.status == 202, started.body
    recovery = await wait_recovery(api_client, started.headers["Location"], key=globex)
    queued = await broker.drain(endpoint_queue(exchange, "shared"))
    leaked = [m.body for m in queued if b"acme-private-order" in m.body]
    assert recovery["replayed"] == 0 and not leaked, (recovery, leaked)


async def test_a_tenant_key_cannot_subscribe_to_every_tenants_events(
    api_client: ApiClient, broker: Broker
) -> None:
    """Tenants share one exchange and a tenant key may bind any topic pattern, so the
    pattern ``#`` receives every event published for every tenant. A tenant key must not
    be able to subscribe outside its own events."""
    exchange = exchange_of(api_client)
    acme = await api_client.create_key(tenant="acme")
    created = await api_client.call(
        "POST", "/v1/endpoints", new_endpoint("acme-all", events=["#"]), key=acme
    )
    if created.status == 201:
        await broker.publish(exchange, "globex.payroll.paid", b'{"salary": 1}')
        depth = await broker.depth(endpoint_queue(exchange, "acme-all"))
        assert depth == 0, "globex's event reached acme's endpoint"
    assert created.status in (403, 422), created.body


async def test_a_stalled_recovery_does_not_hide_other_tenants_dead_letters(
    api_client: ApiClient, broker: Broker
) -> None:
    """A recovery holds every dead letter it has read, unacked, until it ends. A crawling
    rate (1e-9/s) is refused; at the slowest rate allowed, acme's recovery must not leave
    globex's finding nothing while globex's dead letter is still there."""
    exchange = exchange_of(api_client)
    acme = await api_client.create_key(tenant="acme")
    globex = await api_client.create_key(tenant="globex")
    await api_client.call(
        "POST", "/v1/endpoints", new_endpoint("acme-ep", events=["acme.order.*"]), key=acme
    )
    await api_client.call(
        "POST", "/v1/endpoints", new_endpoint("globex-ep", events=["globex.order.*"]), key=globex
    )
    await dead_letter(broker, exchange, "globex-ep", "globex-1")
    await dead_letter(broker, exchange, "acme-ep", "acme-1")
    await dead_letter(broker, exchange, "acme-ep", "acme-2")
    crawl = await api_client.call(
        "POST", "/v1/endpoints/acme-ep/recover", {**SINCE_2000, "rate_per_s": 1e-9}, key=acme
    )
    assert crawl.status == 422, crawl.body
    slowest = await api_client.call(
        "POST", "/v1/endpoints/acme-ep/recover", {**SINCE_2000, "rate_per_s": 1}, key=acme
    )
    assert slowest.status == 202, slowest.body
    started = await api_client.call(
        "POST", "/v1/endpoints/globex-ep/recover", SINCE_2000, key=globex
    )
    assert started.status == 202
    recovery = await wait_recovery(api_client, started.headers["Location"], key=globex)
    assert recovery["replayed"] == 1, recovery


async def test_other_tenants_are_invisible_through_recoveries_cursors_and_filters(
    api_client: ApiClient,
) -> None:
    """globex cannot read acme's recovery by id, a cursor naming acme's endpoints lists
    only globex's, repeated or odd tenant parameters change nothing, and no error names
    acme."""
    acme = await api_client.create_key(tenant="acme")
    globex = await api_client.create_key(tenant="globex")
    for name in ("acme-a", "acme-c"):
        await api_client.call(
            "POST", "/v1/endpoints", new_endpoint(name, events=["acme.order.*"]), key=acme
        )
    await api_client.call(
        "POST", "/v1/endpoints", new_endpoint("globex-b", events=["globex.order.*"]), key=globex
    )
    started = await api_client.call("POST", "/v1/endpoints/acme-a/recover", SINCE_2000, key=acme)
    assert started.status == 202
    location = started.headers["Location"]
    other = await api_client.call("GET", location, key=globex)
    assert other.status == 404
    assert "acme" not in json.dumps(other.body)
    assert (await api_client.call("GET", location, key=acme)).status == 200
    cursor = base64.urlsafe_b64encode(b"acme-a").decode().rstrip("=")
    for query in (
        f"?cursor={cursor}",
        "?limit=1",
        "?tenant=globex&limit=500",
    ):
        listed = await api_client.call("GET", f"/v1/endpoints{query}", key=globex)
        assert listed.status == 200, query
        assert [e["name"] for e in listed.body["data"]] == ["globex-b"], query
    for query in (
        "?tenant=acme&tenant=globex",
        "?tenant=globex&tenant=acme",
        "?tenant=ACME",
        "?tenant=",
        "?tenant=%2A",
    ):
        answer = await api_client.call("GET", f"/v1/endpoints{query}", key=globex)
        assert answer.status in (400, 403), query
    # The documented oracle is the global name; an absent name and acme's read the same.
    for path in ("/v1/endpoints/acme-c", "/v1/endpoints/nobody-has-this"):
        answer = await api_client.call("GET", path, key=globex)
        assert answer.status == 404
        assert answer.body["error"]["code"] == "not_found"


async def test_name_reuse_does_not_reveal_another_tenants_queue(
    api_client: ApiClient, broker: Broker
) -> None:
    """Re-creating a deleted name whose queue still holds events is refused; the refusal
    must not tell another tenant how many of acme's events are waiting there."""
    exchange = exchange_of(api_client)
    acme = await api_client.create_key(tenant="acme")
    globex = await api_client.create_key(tenant="globex")
    await api_client.call(
        "POST", "/v1/endpoints", new_endpoint("busy-name", events=["acme.order.*"]), key=acme
    )
    await broker.publish(exchange, "acme.order.created", b"{}")
    await broker.publish(exchange, "acme.order.created", b"{}")
    await api_client.call("DELETE", "/v1/endpoints/busy-name", key=acme)
    again = await api_client.call(
        "POST", "/v1/endpoints", new_endpoint("busy-name", events=["globex.order.*"]), key=globex
    )
    assert again.status == 409
    assert "2" not in again.body["error"]["message"], again.body


# -- what answers and logs reveal ---------------------------------------------------------


async def test_no_secret_reaches_a_response_or_a_log_line(
    api_client: ApiClient, receiver: Receiver
) -> None:
    """Signing secrets appear only in the create and rotate answers: never in GET, list,
    errors (a ``secret`` field sent back is not echoed), test results, or log lines; nor
    do HOOKLINE_SECRET_KEY or the database URL."""
    with rendered_logs() as lines:
        created = await api_client.call(
            "POST", "/v1/endpoints", new_endpoint("quiet", url=receiver.url("/q"))
        )
        rotated = await api_client.call("POST", "/v1/endpoints/quiet/secret/rotate")
        answers = [
            await api_client.call("GET", "/v1/endpoints/quiet"),
            await api_client.call("GET", "/v1/endpoints"),
            await api_client.call("POST", "/v1/endpoints/quiet/test"),
            await api_client.call(
                "POST", "/v1/endpoints", {**new_endpoint("echo"), "secret": "whsec_echoed"}
            ),
            await api_client.call(
                "PATCH", "/v1/endpoints/quiet", {"secret": created.body["secret"]}
            ),
            await api_client.call("GET", "/readyz", key=None),
            await api_client.call("GET", "/metrics", key=None),
        ]
    secrets = [created.body["secret"], rotated.body["secret"], "whsec_echoed"]
    for answer in answers:
        text = answer.body if isinstance(answer.body, bytes) else json.dumps(answer.body)
        text = text.decode() if isinstance(text, bytes) else text
        assert "whsec_" not in text, text[:200]
    assert any("endpoint_created" in line for line in lines), "no log captured"
    for line in lines:
        for secret in [*secrets, SECRET_KEY, api_client.database_url]:
            assert secret not in line, line


async def test_an_endpoint_the_rules_no_longer_accept_is_a_clear_4xx_that_logs_no_values(
    api_client: ApiClient,
) -> None:
    """A stored row can stop passing validation (the rules tighten in an upgrade, or it is
    edited with SQL, which the registry supports) and a secret can stop opening
    (HOOKLINE_SECRET_KEY rotated without a reseal). /test and /recover must then answer a
    4xx naming the problem, not 500 or 503 "broker unavailable", and the log must not
    carry the stored header values (credentials)."""
    for name in ("stale-headers", "stale-secret"):
        await api_client.call("POST", "/v1/endpoints", new_endpoint(name))
    await sql(
        api_client,
        "UPDATE endpoints SET headers = $1::jsonb WHERE name = 'stale-headers'",
        json.dumps({"Authorization": "tok-9f3k\n"}),
    )
    other_key = SecretBox.from_setting(SecretStr(base64.b64encode(b"o" * 32).decode()))
    sealed = other_key.seal("whsec_" + base64.b64encode(b"s" * 32).decode(), "stale-secret")
    await sql(
        api_client,
        "UPDATE endpoints SET secrets = $1::jsonb WHERE name = 'stale-secret'",
        json.dumps([{"sealed": sealed, "expires_at": None}]),
    )
    answers = {}
    with rendered_logs() as lines:
        for name in ("stale-headers", "stale-secret"):
            for route, body in (("test", None), ("recover", SINCE_2000)):
                answer = await api_client.call("POST", f"/v1/endpoints/{name}/{route}", body)
                answers[name, route] = (answer.status, answer.body["error"]["code"])
    for line in lines:
        assert "tok-9f3k" not in line, line
    for case, (status, code) in answers.items():
        assert 400 <= status < 500, (case, status, code)


async def test_a_failed_recovery_tells_the_tenant_no_internals(api_client: ApiClient) -> None:
    """A recovery's `error` is read by the tenant: it must not carry exception class
    names, internal host names or ports."""
    acme = await api_client.create_key(tenant="acme")
    await api_client.call(
        "POST", "/v1/endpoints", new_endpoint("rcv-err", events=["acme.order.*"]), key=acme
    )
    broker_url = SecretStr("amqp://guest:hunter2@127.0.0.1:1/")
    use_settings(api_client, broker={"url": broker_url})
    started = await api_client.call("POST", "/v1/endpoints/rcv-err/recover", SINCE_2000, key=acme)
    assert started.status == 202
    recovery = await wait_recovery(api_client, started.headers["Location"], key=acme)
    assert recovery["status"] == "failed"
    assert "hunter2" not in json.dumps(recovery)  # held: the password never shows
    assert "127.0.0.1" not in recovery["error"] and "Error" not in recovery["error"], recovery


async def test_credentials_in_endpoint_headers_are_write_only(api_client: ApiClient) -> None:
    """Header values (an Authorization for the receiver) are masked in every answer, as
    they are for the config file's endpoints; the URL's query values too."""
    created = await api_client.call(
        "POST",
        "/v1/endpoints",
        new_endpoint(
            "creds",
            url="http://127.0.0.1:9/hook?token=query-credential",
            headers={"Authorization": "Bearer header-credential"},
        ),
    )
    assert created.status == 201
    for answer in (
        created,
        await api_client.call("GET", "/v1/endpoints/creds"),
        await api_client.call("GET", "/v1/endpoints"),
    ):
        text = json.dumps(answer.body)
        assert "header-credential" not in text and "query-credential" not in text, text


# -- strings PostgreSQL cannot store, and other 5xx --------------------------------------


async def test_strings_postgresql_cannot_store_are_refused_with_422(
    api_client: ApiClient,
) -> None:
    """NUL (which PostgreSQL text and jsonb refuse) and lone surrogates (which UTF-8
    cannot encode) anywhere in a body are the client's error: 422 naming the field, not
    503 "the registry database is unavailable"."""
    cases = {
        "headers": new_endpoint("n1", headers={"X-Tag": "a\x00b"}),
        "headers ": new_endpoint("n2", headers={"X-Tag": "\ud800"}),
        "filter": new_endpoint("n3", filter={"data.kind": "a\x00"}),
        "filter ": new_endpoint("n4", filter={"data.ki\x00nd": "a"}),
        "url": new_endpoint("n5", url="http://127.0.0.1:9/a\x00b"),
        "url ": new_endpoint("n6", url="http://127.0.0.1:9/\ud800"),
    }
    found = {}
    for field, document in cases.items():
        answer = await api_client.call(
            "POST", "/v1/endpoints", raw=raw_json(document), headers=JSON
        )
        found[field] = answer.status
        if answer.status == 422:
            fields = [error["field"] for error in answer.body["error"]["errors"]]
            assert any(name.startswith(field.strip()) for name in fields), (field, fields)
    await api_client.call("POST", "/v1/endpoints", new_endpoint("n7"))
    patched = await api_client.call(
        "PATCH", "/v1/endpoints/n7", raw=raw_json({"headers": {"X-Tag": "\x00"}}), headers=JSON
    )
    found["patch headers"] = patched.status
    # A lone surrogate in the description is refused already (held).
    described = await api_client.call(
        "POST",
        "/v1/endpoints",
        raw=raw_json(new_endpoint("n8", description="\ud800")),
        headers=JSON,
    )
    assert described.status == 422
    assert set(found.values()) == {422}, found


async def test_names_tenants_and_ids_postgresql_cannot_store_are_404_or_400(
    api_client: ApiClient,
) -> None:
    """A NUL in a path or query value cannot name anything: 404 for names and recovery
    ids, 400 for a tenant filter; never 503 "the registry database is unavailable"."""
    found = {}
    for method, path, body in (
        ("GET", "/v1/endpoints/%00", None),
        ("PATCH", "/v1/endpoints/%00", {"description": "x"}),
        ("DELETE", "/v1/endpoints/a%00", None),
        ("POST", "/v1/endpoints/%00/pause", None),
        ("POST", "/v1/endpoints/%00/secret/rotate", None),
        ("POST", "/v1/endpoints/%00/test", None),
        ("POST", "/v1/endpoints/%00/recover", SINCE_2000),
        ("GET", "/v1/recoveries/rcv_%00", None),
    ):
        answer = await api_client.call(method, path, body)
        found[method, path] = answer.status
    tenant = await api_client.call("GET", "/v1/endpoints?tenant=%00")
    found["GET", "?tenant=%00"] = tenant.status
    assert all(status in (400, 404) for status in found.values()), found


async def test_an_overlong_number_in_the_query_is_a_400(api_client: ApiClient) -> None:
    """``?limit=`` with thousands of digits is a 400 like any other bad limit."""
    for limit in ("0", "501", "-1", "1.5", "\uff11", "1" * 20, "1" * 5000):
        answer = await api_client.call("GET", f"/v1/endpoints?limit={limit}")
        assert answer.status == 400, (limit[:10], answer.status)


async def test_recover_refuses_times_it_cannot_use(api_client: ApiClient, broker: Broker) -> None:
    """``since``/``until`` without a UTC offset, or beyond what PostgreSQL stores once
    made UTC, are refused with 422; not a 503, and not a 202 whose recovery then fails
    with "TypeError: can't compare offset-naive and offset-aware datetimes"."""
    await api_client.call("POST", "/v1/endpoints", new_endpoint("when"))
    await dead_letter(broker, exchange_of(api_client), "when", "when-1")
    found = {}
    for body in (
        {"since": "2026-01-01T00:00:00"},
        {"since": "2026-01-01T00:00:00Z", "until": "2027-01-01T00:00:00"},
        {"since": "0001-01-01T00:00:00+01:00"},
        {"since": "9999-12-31T23:59:59-01:00"},
    ):
        answer = await api_client.call("POST", "/v1/endpoints/when/recover", body)
        if answer.status == 202:
            state = await wait_recovery(api_client, answer.headers["Location"])
            found[json.dumps(body)] = (202, state["status"], state["error"])
        else:
            found[json.dumps(body)] = (answer.status, answer.body["error"]["code"], None)
    for body in ({"since": 1e308}, {"since": "yesterday"}, {"since": None}, {}):
        answer = await api_client.call("POST", "/v1/endpoints/when/recover", body)
        assert answer.status == 422, body  # held
    assert all(status == 422 for status, _, _ in found.values()), found


# -- resource exhaustion -----------------------------------------------------------------


async def test_an_endpoint_cannot_hold_thousands_of_bindings_or_headers(
    api_client: ApiClient, broker: Broker
) -> None:
    """A 32 KB body can carry 3,000 topic patterns (3,000 broker bindings, declared one by
    one while a channel of the API's 8 is held) or 3,000 headers (sent with every
    delivery). Both must be refused at once with 422."""
    exchange = exchange_of(api_client)
    patterns = [f"e{n}.*" for n in range(3000)]
    started = time.monotonic()
    try:
        many = await api_client.call(
            "POST", "/v1/endpoints", new_endpoint("many-patterns", events=patterns)
        )
        took_s = time.monotonic() - started
    finally:
        channel = await broker.channel()
        try:
            await channel.queue_delete(endpoint_queue(exchange, "many-patterns"))
        finally:
            await channel.close()
    headers_many = {f"X-H{n}": "v" for n in range(3000)}
    crowded = await api_client.call(
        "POST", "/v1/endpoints", new_endpoint("many-headers", headers=headers_many)
    )
    assert (many.status, crowded.status) == (422, 422), (many.status, crowded.status, took_s)
    assert took_s < 2, took_s


async def test_bodies_at_and_over_the_size_limit(api_client: ApiClient) -> None:
    """A body of exactly api.max_body_bytes is read (and judged: 422); one byte more is
    413 whether or not it says its length."""
    limit = api_client.server.settings.api.max_body_bytes
    prefix, suffix = b'{"name": "', b'"}'
    at_limit = prefix + b"a" * (limit - len(prefix) - len(suffix)) + suffix
    assert len(at_limit) == limit
    answer = await api_client.call("POST", "/v1/endpoints", raw=at_limit, headers=JSON)
    assert answer.status == 422
    over = prefix + b"a" * (limit - len(prefix) - len(suffix) + 1) + suffix
    answer = await api_client.call("POST", "/v1/endpoints", raw=over, headers=JSON)
    assert answer.status == 413

    async def chunks() -> Any:
        for _ in range(limit // 1024 + 2):
            yield b" " * 1024

    async with api_client.session.post(
        api_client.base_url + "/v1/endpoints",
        data=chunks(),
        headers={**JSON, "Authorization": f"Bearer {api_client.admin_key}"},
    ) as response:
        assert response.status == 413


async def test_hostile_json_gets_a_clear_4xx(api_client: ApiClient) -> None:
    """Duplicate keys deep inside, 10,000 levels of nesting, numbers beyond a double or
    with 5,000 digits, -0, a BOM, UTF-16: each a 4xx, never a 5xx."""
    base = json.dumps(new_endpoint("j"))[:-1]
    cases = [
        (base.encode() + b', "filter": {"data.a": {"$eq": 1, "$eq": 2}}}', 400),
        (base.encode() + b', "headers": {"X-A": "1", "X-A": "2"}}', 400),
        (b"[" * 10_000 + b"]" * 10_000, 400),
        (base.encode() + b', "filter": ' + b'{"$not": ' * 5000 + b"{}" + b"}" * 5001, 400),
        (base.encode() + b', "timeout_s": 1e400}', 422),
        (base.encode() + b', "timeout_s": -0.0}', 422),
        (base.encode() + b', "max_in_flight": 18446744073709551617}', 422),
        (base.encode() + b', "max_in_flight": ' + b"9" * 5000 + b"}", 400),
        (base.encode() + b', "filter": {"data.a": 1e400}}', 422),
        (base.encode() + b', "rate_limit_per_s": 5e-324}', 422),
        (b'{"name": "j", "url": "http://127.0.0.1:9/", "events": "order.*"}', 422),
        (b'{"name": "j", "url": "http://127.0.0.1:9/", "events": [], "tenant": null}', 422),
    ]
    for raw, status in cases:
        answer = await api_client.call("POST", "/v1/endpoints", raw=raw, headers=JSON)
        assert answer.status == status, (raw[:80], answer.status, answer.body)
    for raw in (b"\xef\xbb\xbf" + json.dumps(new_endpoint("bom")).encode(),):
        answer = await api_client.call("POST", "/v1/endpoints", raw=raw, headers=JSON)
        assert answer.status < 500
    utf16 = json.dumps(new_endpoint("utf16")).encode("utf-16")
    answer = await api_client.call("POST", "/v1/endpoints", raw=utf16, headers=JSON)
    assert answer.status < 500


# -- injection ---------------------------------------------------------------------------


async def test_sql_in_every_string_is_stored_as_text(api_client: ApiClient) -> None:
    """SQL in a description, a filter path and value, a tenant filter, a cursor and a
    path is data: stored and read back as written, the tables intact."""
    attack = "x'); DROP TABLE endpoints; --"
    created = await api_client.call(
        "POST",
        "/v1/endpoints",
        new_endpoint(
            "inj",
            description=attack,
            filter={"data.a'b": attack, "$or": [{"type": attack}]},
            headers={"X-Quote": attack},
        ),
    )
    assert created.status == 201, created.body
    cursor = base64.urlsafe_b64encode(attack.encode()).decode().rstrip("=")
    for path in (
        f"/v1/endpoints?tenant={attack}",
        f"/v1/endpoints?cursor={cursor}",
        "/v1/endpoints/inj'%20OR%20'1'='1",
        "/v1/recoveries/rcv_'%20OR%201=1--",
    ):
        answer = await api_client.call("GET", path)
        assert answer.status in (200, 400, 404), (path, answer.status)
        if answer.status == 200 and "data" in answer.body:
            assert answer.body["data"] == [], path
    read = await api_client.call("GET", "/v1/endpoints/inj")
    assert read.body["description"] == attack
    assert read.body["headers"] == {"X-Quote": "****"}  # values are write-only
    assert read.body["filter"]["data.a'b"] == attack
    assert [e["name"] for e in (await api_client.call("GET", "/v1/endpoints")).body["data"]] == [
        "inj"
    ]


async def test_header_values_that_no_request_can_carry_are_refused(
    api_client: ApiClient, receiver: Receiver
) -> None:
    """Only CR and LF are refused in header values; other control characters are stored
    and then fail every delivery (aiohttp refuses them: protocol_error). They must be a
    422 when the endpoint is created."""
    found = {}
    for n, value in enumerate(("a\x0bb", "\x7f", "\x01", "a\x1fb")):
        created = await api_client.call(
            "POST",
            "/v1/endpoints",
            new_endpoint(f"ctl-{n}", url=receiver.url(f"/ctl-{n}"), headers={"X-Ctl": value}),
        )
        if created.status == 201:
            sent = await api_client.call("POST", f"/v1/endpoints/ctl-{n}/test")
            found[value] = (201, sent.body["error"])
        else:
            found[value] = (created.status, None)
    # Held: CR, LF and the Unicode line separators never split a header.
    for n, value in enumerate(("a\r\nX-Injected: 1", "a\nb", "a\rb")):
        answer = await api_client.call(
            "POST", "/v1/endpoints", new_endpoint(f"crlf-{n}", headers={"X-A": value})
        )
        assert answer.status == 422
    await api_client.call(
        "POST",
        "/v1/endpoints",
        new_endpoint("uls", url=receiver.url("/uls"), headers={"X-A": "a\u2028b\x85c"}),
    )
    await api_client.call("POST", "/v1/endpoints/uls/test")
    assert all("X-Injected" not in r.headers for r in receiver.requests)
    assert all(status == 422 for status, _ in found.values()), found


async def test_a_url_is_stored_as_it_is_dialled(api_client: ApiClient, receiver: Receiver) -> None:
    """yarl drops tabs, CR and LF from a URL, so ``http://h/a\\r\\nX-Injected: 1`` is
    dialled as ``/aX-Injected: 1`` while the API stores and shows the CR/LF; a URL with
    control characters must be refused (no request is split either way: held)."""
    found = {}
    for n, url in enumerate(
        (receiver.url("/a\r\nX-Injected: 1"), receiver.url("/b\tc"), receiver.url("/d\ne"))
    ):
        created = await api_client.call("POST", "/v1/endpoints", new_endpoint(f"cr-{n}", url=url))
        found[url] = created.status
        if created.status == 201:
            await api_client.call("POST", f"/v1/endpoints/cr-{n}/test")
    assert all("X-Injected" not in r.headers for r in receiver.requests)  # held
    assert set(found.values()) == {422}, found


# -- SSRF --------------------------------------------------------------------------------


async def test_the_test_route_reaches_no_private_address_in_any_spelling(
    api_client: ApiClient, receiver: Receiver
) -> None:
    """With security.allow_private_networks off, POST /test to loopback in every spelling
    (name, trailing dot, upper case, 0.0.0.0, IPv4-mapped, -compatible, NAT64, 6to4, ::)
    is blocked and the receiver on 127.0.0.1 hears nothing; legacy
    numeric and non-ASCII spellings are refused when the endpoint is created."""
    port = receiver.base_url.rsplit(":", 1)[1]
    hosts = (
        "127.0.0.1",
        "localhost",
        "LOCALHOST",
        "localhost.",
        "0.0.0.0",
        "[::ffff:127.0.0.1]",
        "[::ffff:7f00:1]",
        "[::127.0.0.1]",
        "[64:ff9b::7f00:1]",
        "[2002:7f00:1::]",
        "[::]",
    )
    names = []
    for n, host in enumerate(hosts):
        created = await api_client.call(
            "POST", "/v1/endpoints", new_endpoint(f"ssrf-{n}", url=f"http://{host}:{port}/x")
        )
        assert created.status == 201, (host, created.body)
        names.append(f"ssrf-{n}")
    use_settings(api_client, security={"allow_private_networks": False})
    for name, host in zip(names, hosts, strict=True):
        answer = await api_client.call("POST", f"/v1/endpoints/{name}/test")
        assert answer.status == 200
        assert answer.body["delivered"] is False, host
        assert answer.body["error"] in ("blocked_destination", "dns_error"), (host, answer.body)
        assert str(port) not in answer.body["detail"]
    assert receiver.requests == []
    for n, host in enumerate(
        (
            "2130706433",
            "127.1",
            "0177.0.0.1",
            "0x7f.0.0.1",
            "127.0.0.1.",
            "\u2460\u2461\u2466.0.0.1",
            "\uff11\uff12\uff17.0.0.1",
        )
    ):
        refused = await api_client.call(
            "POST", "/v1/endpoints", new_endpoint(f"legacy-{n}", url=f"http://{host}:{port}/")
        )
        assert refused.status == 422, host


async def test_the_test_route_does_not_follow_redirects(
    api_client: ApiClient, receiver: Receiver
) -> None:
    """An endpoint answering 302 to elsewhere is reported as a 302; the target is never
    requested."""
    receiver.script("/redirect", (302, {"Location": receiver.url("/elsewhere")}))
    await api_client.call(
        "POST", "/v1/endpoints", new_endpoint("redir", url=receiver.url("/redirect"))
    )
    answer = await api_client.call("POST", "/v1/endpoints/redir/test")
    assert answer.body["delivered"] is False
    assert answer.body["status"] == 302
    assert receiver.on("/elsewhere") == []


# -- rotation and races ------------------------------------------------------------------


async def test_rotation_bounds(api_client: ApiClient) -> None:
    """At most ten secrets sign at once however often one rotates; the grace is bounded
    by MAX_GRACE_S and must be a number; a short grace ends on time; -0 means none."""
    await api_client.call("POST", "/v1/endpoints", new_endpoint("rot"))
    for _ in range(12):
        rotated = await api_client.call(
            "POST", "/v1/endpoints/rot/secret/rotate", {"grace_s": 3600}
        )
        assert rotated.status == 200
    assert (await api_client.call("GET", "/v1/endpoints/rot")).body["signing_secrets"] == 10
    for grace, status in (
        (MAX_GRACE_S, 200),
        (MAX_GRACE_S + 1, 422),
        ("60", 422),
        (True, 422),
        (None, 422),
        (1e400, 422),
    ):
        raw = json.dumps({"grace_s": grace}).replace("Infinity", "1e400").encode()
        answer = await api_client.call(
            "POST", "/v1/endpoints/rot/secret/rotate", raw=raw, headers=JSON
        )
        assert answer.status == status, (grace, answer.body)
    await api_client.call("POST", "/v1/endpoints/rot/secret/rotate", {"grace_s": -0.0})
    assert (await api_client.call("GET", "/v1/endpoints/rot")).body["signing_secrets"] == 1
    await api_client.call("POST", "/v1/endpoints/rot/secret/rotate", {"grace_s": 0.3})
    assert (await api_client.call("GET", "/v1/endpoints/rot")).body["signing_secrets"] == 2
    await asyncio.sleep(0.5)
    assert (await api_client.call("GET", "/v1/endpoints/rot")).body["signing_secrets"] == 1


async def test_patches_racing_a_delete_leave_no_binding_behind(
    api_client: ApiClient, broker: Broker
) -> None:
    """Ten PATCHes flipping the patterns race one DELETE: each answers 200 or 404, the
    endpoint is gone, and no event of either pattern reaches its queue afterwards."""
    exchange = exchange_of(api_client)
    await api_client.call("POST", "/v1/endpoints", new_endpoint("racer"))
    patches = [
        api_client.call(
            "PATCH",
            "/v1/endpoints/racer",
            {"events": ["invoice.*"] if n % 2 else ["order.*", "refund.*"]},
        )
        for n in range(10)
    ]
    answers = await asyncio.gather(
        *patches[:5], api_client.call("DELETE", "/v1/endpoints/racer"), *patches[5:]
    )
    assert {answer.status for answer in answers} <= {200, 404}, [a.status for a in answers]
    assert (await api_client.call("GET", "/v1/endpoints/racer")).status == 404
    queue = endpoint_queue(exchange, "racer")
    before = await broker.depth(queue)
    for topic in ("order.created", "invoice.paid", "refund.issued"):
        await broker.publish(exchange, topic, b"{}")
    assert await broker.depth(queue) == before
