"""Wire-level tricks that would get around policy or redaction: content and transfer codings in
odd spellings (both ways), method-override headers, range requests that fetch an echoed key in
halves, an agent's own copy of an injected query parameter, and two different tokens in one
request. Requests HTTP clients would normalise are sent byte for byte over a raw socket; answers
no HTTP server library would send come from `RawUpstream`. Every trick has a benign neighbour
that must still pass."""

from __future__ import annotations

import gzip
import json
import socket
import threading
import urllib.parse
from typing import Callable

import pytest

from conftest import DEADLINE, b64, fake_secret, new_token, raw_request

BODY = json.dumps({"model": "gpt-fake", "messages": []}).encode()


def config(upstream: str, raw_upstream: str | None = None) -> str:
    """`openai` (bearer), `ranged` (bearer, `allow_range`), `gemini` (`query:key`) in front of the
    fake upstream, and `raw` (bearer) in front of a RawUpstream when one is given."""
    raw = ""
    if raw_upstream:
        raw = f"""
[routes.raw]
prefix = "/raw"
upstream = "{raw_upstream}"
secret = "openai"
allow = ["POST /v1/chat/completions", "GET /v1/files/*"]

[routes.rawranged]
prefix = "/rawranged"
upstream = "{raw_upstream}"
secret = "openai"
allow = ["GET /v1/files/*"]
allow_range = true
"""
    routes = '"openai", "ranged", "gemini", "streamed"' + (', "raw", "rawranged"' if raw_upstream else "")
    return f"""\
listen = ["127.0.0.1:0"]

[secrets.openai]
source = "env"
name = "OPENAI_API_KEY"

[secrets.gemini]
source = "env"
name = "GEMINI_API_KEY"

[routes.openai]
prefix = "/openai"
upstream = "{upstream}"
secret = "openai"
allow = ["POST /v1/chat/completions", "GET /v1/models", "GET /v1/files/*"]

[routes.streamed]
prefix = "/streamed"
upstream = "{upstream}"
secret = "openai"
allow = ["POST /v1/chat/completions"]
request_scan = "redact"

[routes.ranged]
prefix = "/ranged"
upstream = "{upstream}"
secret = "openai"
allow = ["GET /v1/files/*"]
allow_range = true

[routes.gemini]
prefix = "/gemini"
upstream = "{upstream}"
secret = "gemini"
inject = "query:key"
allow = ["GET /v1/echo", "POST /v1/echo"]
{raw}
[agents.coder]
routes = [{routes}]
token_env = "KEYGATE_AGENT_TOKEN"
"""


class Setup:
    def __init__(self, kg, token: str, openai_key: str, gemini_key: str):
        self.kg, self.token, self.openai_key, self.gemini_key = kg, token, openai_key, gemini_key

    def raw(self, request_line: str, extra: str = "", body: bytes = BODY, framing: str | None = None, auth: str | None = None):
        """One request over a raw socket; `framing` replaces the Content-Length line."""
        head = (
            f"{request_line}\n"
            f"Host: 127.0.0.1:{self.kg.port}\n"
            f"{auth if auth is not None else f'Authorization: Bearer {self.token}'}\n"
            f"Content-Type: application/json\n"
            f"{framing if framing is not None else f'Content-Length: {len(body)}'}\n"
            f"{extra}"
        )
        return raw_request(self.kg.port, head, body)

    def client(self):
        return self.kg.client(headers={"Authorization": f"Bearer {self.token}"})


def start(keygate, upstream: str, raw_upstream: str | None = None) -> Setup:
    token, openai_key, gemini_key = new_token(), fake_secret("sk-proj-wire"), fake_secret("AIzaSy-wire")
    kg = keygate(
        config(upstream, raw_upstream),
        env={"KEYGATE_AGENT_TOKEN": token, "OPENAI_API_KEY": openai_key, "GEMINI_API_KEY": gemini_key},
    )
    return Setup(kg, token, openai_key, gemini_key)


@pytest.fixture
def wire(keygate, fake_upstream):
    return start(keygate, fake_upstream.url)


def assert_refused(s: Setup, r, status: int, code: str) -> None:
    """A keygate error with this status and code, and one deny record for it."""
    status_got = r.status if hasattr(r, "status") else r.status_code
    assert status_got == status, (status_got, r.body if hasattr(r, "body") else r.text)
    body = r.json()
    assert body["ok"] is False and body["error"]["code"] == code, body
    record = s.kg.audit_record(r.headers["x-request-id"])
    assert record["decision"] == "deny" and record["status"] == status and record["reason"] == code, record


def chunked(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data)


# === a raw upstream ===


class RawUpstream:
    """Reads one request per connection and writes back `answer(request_head)` verbatim, then
    closes. `heads` keeps every request head it read, in order."""

    def __init__(self, answer: Callable[[str], bytes]):
        self.answer = answer
        self.heads: list[str] = []
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self._sock.settimeout(0.05)
        self._thread = threading.Thread(target=self._serve, name="raw-upstream", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._sock.getsockname()[1]}"

    def _serve(self) -> None:
        while not self._stopped.is_set():
            try:
                conn, _ = self._sock.accept()
            except (socket.timeout, BlockingIOError):
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(DEADLINE)
                try:
                    head = self._read_request(conn)
                except (OSError, ValueError):
                    continue
                with self._lock:
                    self.heads.append(head)
                try:
                    conn.sendall(self.answer(head))
                    conn.shutdown(socket.SHUT_WR)
                    # Wait for keygate to close its side, so no unread byte turns the close into a reset.
                    while conn.recv(65536):
                        pass
                except OSError:
                    pass

    @staticmethod
    def _read_request(conn: socket.socket) -> str:
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = conn.recv(65536)
            if not chunk:
                raise ValueError("connection closed before the request head ended")
            buf += chunk
        head, rest = buf.split(b"\r\n\r\n", 1)
        text = head.decode("latin-1")
        lower = text.lower()
        if "transfer-encoding: chunked" in lower:
            while not rest.endswith(b"0\r\n\r\n"):
                chunk = conn.recv(65536)
                if not chunk:
                    break
                rest += chunk
        else:
            n = 0
            for line in text.split("\r\n")[1:]:
                k, _, v = line.partition(":")
                if k.strip().lower() == "content-length":
                    n = int(v.strip())
            while len(rest) < n:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                rest += chunk
        return text

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=DEADLINE)
        self._sock.close()


def bearer_of(head: str) -> str:
    for line in head.split("\r\n")[1:]:
        k, _, v = line.partition(":")
        if k.strip().lower() == "authorization":
            return v.strip().split(" ", 1)[-1]
    return ""


def response(status: str, headers: list[str], body: bytes) -> bytes:
    return (f"HTTP/1.1 {status}\r\n" + "".join(f"{h}\r\n" for h in headers) + "Connection: close\r\n\r\n").encode() + body


@pytest.fixture
def raw_upstream():
    holder: dict = {}
    up = RawUpstream(lambda head: holder["answer"](head))
    up.holder = holder  # type: ignore[attr-defined]
    yield up
    up.stop()


def with_raw(keygate, fake_upstream, raw_upstream, answer: Callable[[str], bytes]) -> Setup:
    raw_upstream.holder["answer"] = answer
    return start(keygate, fake_upstream.url, raw_upstream.url)


def assert_no_key_in(body: bytes, key: str) -> None:
    assert key.encode() not in body, body
    try:
        plain = gzip.decompress(body)
    except (OSError, EOFError):
        return
    assert key.encode() not in plain, plain


# === 1, 2: content and transfer codings on requests ===


@pytest.mark.parametrize(
    "extra",
    [
        "Content-Encoding: identity\nContent-Encoding: gzip\n",
        "Content-Encoding: identity, gzip\n",
        "Content-Encoding: gzip, identity\n",
        "Content-Encoding: br\n",
    ],
    ids=["two-headers", "list-identity-gzip", "list-gzip-identity", "br"],
)
def test_request_with_a_content_coding_in_any_header_instance_is_refused(wire, fake_upstream, extra):
    key = fake_secret("ghp_")
    body = gzip.compress(json.dumps({"model": "gpt-fake", "messages": [{"role": "user", "content": key}]}).encode())
    r = wire.raw("POST /openai/v1/chat/completions HTTP/1.1", extra=extra, body=body)
    assert_refused(wire, r, 415, "request_encoding_not_scannable")
    assert fake_upstream.requests == []


@pytest.mark.parametrize(
    "extra", ["Content-Encoding: identity\n", "Content-Encoding: identity\nContent-Encoding: IDENTITY\n", ""]
)
def test_request_labelled_identity_is_forwarded(wire, fake_upstream, extra):
    r = wire.raw("POST /openai/v1/chat/completions HTTP/1.1", extra=extra)
    assert r.status == 200, r.body
    assert [q.body for q in fake_upstream.requests] == [BODY]


@pytest.mark.parametrize(
    "framing",
    [
        "Transfer-Encoding: gzip, chunked",
        "Transfer-Encoding: gzip\nTransfer-Encoding: chunked",
        "Transfer-Encoding: identity, chunked",
        "Transfer-Encoding: chunked, chunked",
    ],
    ids=["gzip-chunked", "gzip-then-chunked-headers", "identity-chunked", "chunked-twice"],
)
def test_request_transfer_coding_other_than_chunked_is_refused(wire, fake_upstream, framing):
    key = fake_secret("ghp_")
    payload = json.dumps({"model": "gpt-fake", "messages": [{"role": "user", "content": key}]}).encode()
    body = gzip.compress(payload) if "gzip" in framing else payload
    r = wire.raw("POST /openai/v1/chat/completions HTTP/1.1", body=chunked(body), framing=framing)
    assert_refused(wire, r, 400, "invalid_transfer_encoding")
    assert fake_upstream.requests == []


def test_chunked_request_is_forwarded(wire, fake_upstream):
    r = wire.raw("POST /openai/v1/chat/completions HTTP/1.1", body=chunked(BODY), framing="Transfer-Encoding: chunked")
    assert r.status == 200, r.body
    assert [q.body for q in fake_upstream.requests] == [BODY]


# === 1: content and transfer codings on responses ===


def gz_echo(headers: list[str], framed: Callable[[bytes], bytes] | None = None):
    """An upstream answer holding, gzipped, the key it was sent."""

    def answer(head: str) -> bytes:
        body = gzip.compress(json.dumps({"echo": bearer_of(head)}).encode())
        framing = [] if framed else [f"Content-Length: {len(body)}"]
        return response("200 OK", ["Content-Type: application/json", *headers, *framing], framed(body) if framed else body)

    return answer


@pytest.mark.parametrize(
    "headers, framed",
    [
        (["Content-Encoding: identity", "Content-Encoding: gzip"], None),
        (["Content-Encoding: identity, gzip"], None),
        (["Content-Encoding: gzip, identity"], None),
        (["Transfer-Encoding: gzip, chunked"], chunked),
        (["Transfer-Encoding: gzip", "Transfer-Encoding: chunked"], chunked),
        (["Transfer-Encoding: gzip"], lambda b: b),
    ],
    ids=["two-ce-headers", "ce-list", "ce-list-reversed", "te-gzip-chunked", "te-two-headers", "te-gzip-to-eof"],
)
def test_upstream_answer_with_a_coding_in_any_header_instance_is_not_passed_on(
    keygate, fake_upstream, raw_upstream, headers, framed
):
    s = with_raw(keygate, fake_upstream, raw_upstream, gz_echo(headers, framed))
    with s.client() as c:
        r = c.post("/raw/v1/chat/completions", content=BODY)
    assert r.status_code == 502, r.content
    assert_no_key_in(r.content, s.openai_key)
    assert_refused(s, r, 502, "upstream_unredactable")
    assert len(raw_upstream.heads) == 1


@pytest.mark.parametrize(
    "headers, framed",
    [
        (["Content-Encoding: identity"], None),
        (["Content-Encoding: identity", "Content-Encoding: identity"], None),
        (["Transfer-Encoding: chunked"], chunked),
    ],
    ids=["ce-identity", "ce-identity-twice", "te-chunked"],
)
def test_upstream_answer_labelled_identity_or_chunked_is_passed_on_redacted(
    keygate, fake_upstream, raw_upstream, headers, framed
):
    def answer(head: str) -> bytes:
        body = json.dumps({"echo": bearer_of(head)}).encode()
        framing = [] if framed else [f"Content-Length: {len(body)}"]
        return response("200 OK", ["Content-Type: application/json", *headers, *framing], framed(body) if framed else body)

    s = with_raw(keygate, fake_upstream, raw_upstream, answer)
    with s.client() as c:
        r = c.post("/raw/v1/chat/completions", content=BODY)
    assert r.status_code == 200, r.content
    assert s.openai_key not in r.text
    assert r.json()["echo"].startswith("[REDACTED"), r.text


# === 3: method-override headers ===

OVERRIDES = ["X-HTTP-Method-Override", "X-HTTP-Method", "X-Method-Override"]


@pytest.mark.parametrize("name", OVERRIDES)
def test_method_override_naming_another_method_is_refused(wire, fake_upstream, name):
    with wire.client() as c:
        r = c.post("/openai/v1/chat/completions", content=BODY, headers={name: "DELETE"})
    assert_refused(wire, r, 400, "method_override_not_allowed")
    assert fake_upstream.requests == []


def test_method_override_in_a_second_header_instance_is_refused(wire, fake_upstream):
    r = wire.raw(
        "POST /openai/v1/chat/completions HTTP/1.1", extra="X-HTTP-Method-Override: POST\nX-HTTP-Method-Override: DELETE\n"
    )
    assert_refused(wire, r, 400, "method_override_not_allowed")
    assert fake_upstream.requests == []


@pytest.mark.parametrize("name", OVERRIDES)
def test_method_override_naming_the_request_method_is_dropped_and_forwarded(wire, fake_upstream, name):
    with wire.client() as c:
        r = c.post("/openai/v1/chat/completions", content=BODY, headers={name: "post"})
    assert r.status_code == 200, r.text
    [seen] = fake_upstream.requests
    assert seen.method == "POST" and seen.header(name) is None, seen.headers


# === 3b: the `_method` parameter Rails, Laravel and Symfony read as the method of a POST ===


@pytest.mark.parametrize(
    "query", ["_method=DELETE", "a=1&_METHOD=delete", "%5Fmethod=PUT", ".method=DELETE", "_method%5B%5D=PATCH"]
)
def test_method_override_query_parameter_naming_another_method_is_refused(wire, fake_upstream, query):
    with wire.client() as c:
        r = c.post(f"/openai/v1/chat/completions?{query}", content=BODY)
    assert_refused(wire, r, 400, "method_override_not_allowed")
    assert fake_upstream.requests == []


def test_method_query_parameter_naming_the_request_method_or_another_name_is_forwarded(wire, fake_upstream):
    query = "_method=post&my_method=DELETE&q=_method%3DDELETE"
    with wire.client() as c:
        r = c.post(f"/openai/v1/chat/completions?{query}", content=BODY)
    assert r.status_code == 200, r.text
    [seen] = fake_upstream.requests
    assert (seen.method, seen.query) == ("POST", query)


FORM = {"Content-Type": "application/x-www-form-urlencoded"}


@pytest.mark.parametrize("prefix", ["/openai", "/streamed"])
def test_form_body_method_field_naming_another_method_is_refused(wire, fake_upstream, prefix):
    """Also on a route whose bodies otherwise stream (`request_scan = "redact"`): a form body is
    read whole to be checked."""
    with wire.client() as c:
        r = c.post(f"{prefix}/v1/chat/completions", content=b"a=1&_method=DELETE", headers=FORM)
    assert_refused(wire, r, 400, "method_override_not_allowed")
    assert fake_upstream.requests == []


@pytest.mark.parametrize("prefix", ["/openai", "/streamed"])
def test_form_body_naming_the_request_method_or_mentioning_method_is_forwarded(wire, fake_upstream, prefix):
    body = b"text=set+_method%3DDELETE&_method=POST"
    with wire.client() as c:
        r = c.post(f"{prefix}/v1/chat/completions", content=body, headers=FORM)
        as_json = c.post(f"{prefix}/v1/chat/completions", json={"_method": "DELETE", "messages": []})
    assert r.status_code == 200 and as_json.status_code == 200, (r.text, as_json.text)
    assert [seen.body for seen in fake_upstream.requests][0] == body


# === 4: range requests ===

RANGE_HEADERS = {"Range": "bytes=0-9", "If-Range": '"etag"', "Request-Range": "bytes=0-9"}


def test_range_headers_are_not_forwarded_by_default(wire, fake_upstream):
    with wire.client() as c:
        r = c.get("/openai/v1/files/f1", headers=RANGE_HEADERS)
    assert r.status_code == 200, r.text
    [seen] = fake_upstream.requests
    for name in RANGE_HEADERS:
        assert seen.header(name) is None, seen.headers


def test_range_headers_are_forwarded_on_a_route_that_allows_ranges(wire, fake_upstream):
    with wire.client() as c:
        r = c.get("/ranged/v1/files/f1", headers=RANGE_HEADERS)
    assert r.status_code == 200, r.text
    [seen] = fake_upstream.requests
    assert seen.header("range") == "bytes=0-9", seen.headers


def partial_echo(head: str) -> bytes:
    body = json.dumps({"echo": bearer_of(head)}).encode()[:10]
    return response("206 Partial Content", ["Content-Range: bytes 0-9/80", f"Content-Length: {len(body)}"], body)


def test_partial_answer_to_a_request_without_range_is_refused(keygate, fake_upstream, raw_upstream):
    s = with_raw(keygate, fake_upstream, raw_upstream, partial_echo)
    with s.client() as c:
        # The agent's Range is stripped, so the upstream was asked for the whole body.
        r = c.get("/raw/v1/files/f1", headers={"Range": "bytes=0-9"})
    assert_refused(s, r, 502, "upstream_unexpected_partial")
    assert "range:" not in raw_upstream.heads[0].lower()


def test_partial_answer_to_a_ranged_request_on_an_allowing_route_is_passed_on(keygate, fake_upstream, raw_upstream):
    s = with_raw(keygate, fake_upstream, raw_upstream, partial_echo)
    with s.client() as c:
        r = c.get("/rawranged/v1/files/f1", headers={"Range": "bytes=0-9"})
    assert r.status_code == 206, r.text
    assert "range: bytes=0-9" in raw_upstream.heads[0].lower()


def switching_protocols(head: str) -> bytes:
    echo = json.dumps({"echo": bearer_of(head)}).encode()
    return b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n" + echo


def test_switching_protocols_answer_to_a_request_without_upgrade_is_refused(keygate, fake_upstream, raw_upstream):
    """keygate proxies no upgrade, so a 101 is never one the agent asked for; whatever protocol
    follows it could not be redacted. (The raw route's ordinary 200 answers pass: see
    test_upstream_answer_labelled_identity_or_chunked_is_passed_on_redacted.)"""
    s = with_raw(keygate, fake_upstream, raw_upstream, switching_protocols)
    with s.client() as c:
        r = c.post("/raw/v1/chat/completions", content=BODY)
    assert_refused(s, r, 502, "upstream_protocol_switch")
    assert s.openai_key not in r.text and "upgrade" not in {k.lower() for k in r.headers}


# === 5: the agent's own copy of an injected query parameter ===


@pytest.mark.parametrize(
    "query",
    [
        "key=agent",
        "a=1&key=agent&b=2",
        "k%65y=agent",
        "%6B%65%79=agent",
        "key[]=agent",
        "key%5B%5D=agent",
        "key[0]=agent",
        "KEY=agent",
        "key",
        "a=1;key=agent",
    ],
)
def test_agent_copy_of_the_injected_query_parameter_is_dropped(wire, fake_upstream, query):
    with wire.client() as c:
        r = c.get(f"/gemini/v1/echo?{query}")
    assert r.status_code == 200, r.text
    [seen] = fake_upstream.requests
    assert "agent" not in seen.query, seen.query
    pairs = urllib.parse.parse_qsl(seen.query, keep_blank_values=True)
    assert [v for k, v in pairs if k.lower().startswith("key")] == [wire.gemini_key], pairs
    if "a=1" in query:
        assert ("a", "1") in pairs or ("a", "1;") in pairs, pairs


def test_other_query_parameters_are_forwarded_unchanged(wire, fake_upstream):
    query = "keyword=x&monkey=1&key_id=3&page=2&q=a+b&x=%41&a=1&&b=2"
    with wire.client() as c:
        r = c.get(f"/gemini/v1/echo?{query}")
    assert r.status_code == 200, r.text
    [seen] = fake_upstream.requests
    assert seen.query.startswith(query + "&key="), seen.query


# === 6: two tokens in one request ===


@pytest.mark.parametrize(
    "headers",
    [
        "X-Broker-Token: {token}\nX-Broker-Token: {other}\n",
        "X-Broker-Token: {other}\nX-Broker-Token: {token}\n",
        "X-Broker-Token: {token}\nAuthorization: Bearer {other}\n",
        "Authorization: Bearer {other}\nx-api-key: {token}\n",
    ],
    ids=["two-broker-tokens", "two-broker-tokens-valid-second", "broker-and-bearer", "bearer-and-x-api-key"],
)
def test_two_different_tokens_are_refused_as_ambiguous(wire, fake_upstream, headers):
    other = new_token()
    auth = headers.format(token=wire.token, other=other).rstrip("\n")
    r = wire.raw("POST /openai/v1/chat/completions HTTP/1.1", auth=auth)
    assert_refused(wire, r, 400, "ambiguous_credentials")
    assert other not in r.body.decode() and wire.token not in r.body.decode()
    assert fake_upstream.requests == []


@pytest.mark.parametrize(
    "headers",
    [
        "Authorization: Bearer {token}\nx-api-key: {token}\n",
        "X-Broker-Token: {token}\nAuthorization: Bearer {token}\n",
        "X-Broker-Token: {token}\nX-Broker-Token: {token}\n",
        "Authorization: Basic {basic}\nX-Broker-Token: {token}\n",
    ],
    ids=["anthropic-sdk-style", "broker-and-bearer-same", "broker-twice-same", "basic-is-not-a-token"],
)
def test_the_same_token_in_several_headers_is_accepted(wire, fake_upstream, headers):
    auth = headers.format(token=wire.token, basic=b64("user:" + fake_secret("pw"))).rstrip("\n")
    r = wire.raw("POST /openai/v1/chat/completions HTTP/1.1", auth=auth)
    assert r.status == 200, r.body
    [seen] = fake_upstream.requests
    assert seen.header("authorization") == f"Bearer {wire.openai_key}"
    assert seen.header("x-api-key") is None and seen.header("x-broker-token") is None

