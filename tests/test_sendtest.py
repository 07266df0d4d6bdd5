"""``worker send-test``: a signed hookline.test event straight to one endpoint."""

from __future__ import annotations

import json
from pathlib import Path

from standardwebhooks.webhooks import Webhook

from tests.conftest import SECRET_A, Receiver, endpoint, make_document, run_python, write_config


async def send_test(config: Path, name: str) -> tuple[int, str]:
    code, out, err = await run_python(
        "-m", "worker", "send-test", "--config", str(config), "--endpoint", name
    )
    return code, out + err


async def test_send_test_posts_a_signed_ping_to_that_endpoint_only(
    tmp_path: Path, receiver: Receiver
) -> None:
    """The named endpoint gets one verifiable hookline.test event; the others get nothing;
    the command prints the status and the time it took."""
    config = write_config(
        tmp_path,
        make_document(
            "unused",
            [
                endpoint("one", receiver.url("/one"), ["a.#"]),
                endpoint("two", receiver.url("/two"), ["a.#"]),
            ],
        ),
    )
    code, out = await send_test(config, "one")
    assert code == 0, out
    [request] = receiver.requests
    assert request.path == "/one"
    event = json.loads(request.body)
    assert event["type"] == "hookline.test" and event["data"]["endpoint"] == "one"
    Webhook(SECRET_A).verify(request.body, request.headers)
    assert out.startswith("one: HTTP 200 in ") and f"(event {event['id']})" in out


async def test_send_test_fails_with_the_answer_of_a_failing_endpoint(
    tmp_path: Path, receiver: Receiver
) -> None:
    """A non-2xx answer exits 1 and shows the response excerpt; an unknown name exits 2."""
    receiver.script("/bad", 401)
    config = write_config(
        tmp_path,
        make_document(
            "unused",
            [
                endpoint("bad", receiver.url("/bad"), ["a.#"]),
            ],
        ),
    )
    code, out = await send_test(config, "bad")
    assert code == 1
    assert "HTTP 401" in out and "answer from the test receiver" in out
    code, out = await send_test(config, "nope")
    assert code == 2 and "no endpoint named 'nope'" in out


async def test_send_test_reports_an_unreachable_endpoint(tmp_path: Path) -> None:
    """A refused connection is named, not a traceback."""
    config = write_config(
        tmp_path,
        make_document(
            "unused",
            [
                endpoint("off", "http://127.0.0.1:9/hook", ["a.#"]),
            ],
        ),
    )
    code, out = await send_test(config, "off")
    assert code == 1
    assert out.startswith("off: connection_error after") and "Traceback" not in out
