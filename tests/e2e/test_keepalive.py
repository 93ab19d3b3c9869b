"""Keep-alive after a refusal. keygate may refuse a request from its headers alone, before the
body has arrived. It must then either say `Connection: close` (so the client opens a new
connection for its next request) or read the body and keep serving the connection. Closing it
silently makes pooled clients (every SDK) fail their next request with "server disconnected"."""

from __future__ import annotations

import json
import select
import socket

import pytest

from conftest import DEADLINE, fake_secret, lab_config

CLIENT_TOKEN = fake_secret("lab-client-")
KEY = fake_secret("sk-proj-keepalive")
BODY = json.dumps({"model": "gpt-fake", "messages": []}).encode()


class RawConnection:
    """One keep-alive HTTP/1.1 connection, read response by response."""

    def __init__(self, port: int):
        self.port = port
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
        self.buf = b""

    def head(self, path: str, token: str) -> bytes:
        return (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(BODY)}\r\n\r\n"
        ).encode()

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            raise AssertionError("keygate closed the keep-alive connection without `Connection: close`") from None

    def answered_already(self) -> bool:
        """Whether an answer is waiting, checked for a moment (decides only the order of the
        steps below; either order ends in the same assertions)."""
        return bool(self.buf) or bool(select.select([self.sock], [], [], 0.3)[0])

    def _fill(self) -> None:
        try:
            chunk = self.sock.recv(65536)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            raise AssertionError("keygate closed the keep-alive connection without `Connection: close`")
        self.buf += chunk

    def response(self) -> tuple[int, dict[str, str], bytes]:
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        if "chunked" in headers.get("transfer-encoding", ""):
            body = b""
            while True:
                while b"\r\n" not in self.buf:
                    self._fill()
                size_line, self.buf = self.buf.split(b"\r\n", 1)
                size = int(size_line.split(b";")[0], 16)
                while len(self.buf) < size + 2:
                    self._fill()
                body, self.buf = body + self.buf[:size], self.buf[size + 2 :]
                if size == 0:
                    break
        else:
            n = int(headers.get("content-length", "0"))
            while len(self.buf) < n:
                self._fill()
            body, self.buf = self.buf[:n], self.buf[n:]
        return int(lines[0].split(" ")[1]), headers, body

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def proxy(keygate, fake_upstream):
    return keygate(
        lab_config("env.example", fake_upstream.url),
        env={"BROKER_CLIENT_TOKEN": CLIENT_TOKEN, "OPENAI_API_KEY": KEY},
    )


@pytest.mark.parametrize(
    "path, token, status",
    [
        ("/v1/images/generations", CLIENT_TOKEN, 403),
        ("/v1/chat/completions", "x" * 20, 401),
    ],
    ids=["path_not_allowed", "invalid_token"],
)
def test_connection_after_an_early_refusal_is_closed_explicitly_or_still_usable(proxy, fake_upstream, path, token, status):
    conn = RawConnection(proxy.port)
    try:
        conn.send(conn.head(path, token))  # the body follows later, as from a client that writes it separately
        early = conn.answered_already()
        if not early:
            conn.send(BODY)
        got, headers, _ = conn.response()
        assert got == status
        if "close" in headers.get("connection", "").lower():
            return  # the client is told not to reuse the connection
        if early:
            conn.send(BODY)
        conn.send(conn.head("/v1/chat/completions", CLIENT_TOKEN) + BODY)
        again, _, body = conn.response()
        assert again == 200, body
    finally:
        conn.close()
    assert [r.path for r in fake_upstream.requests] == ["/v1/chat/completions"]


def test_keep_alive_connection_serves_several_allowed_requests(proxy, fake_upstream):
    conn = RawConnection(proxy.port)
    try:
        for _ in range(3):
            conn.send(conn.head("/v1/chat/completions", CLIENT_TOKEN) + BODY)
            status, _, body = conn.response()
            assert status == 200, body
    finally:
        conn.close()
    assert len(fake_upstream.requests) == 3


def test_each_request_on_a_keep_alive_connection_gets_its_own_upstream_deadline(keygate, fake_upstream):
    """The upstream deadline is kept by the connection and re-armed per request: a request sent
    after the previous one's deadline has passed is not cut by it, a hung upstream still gets
    504 `upstream_timeout`, and the connection's next request gets a whole deadline again."""
    import time

    kg = keygate(
        lab_config("env.example", fake_upstream.url, upstream_timeout_seconds=1),
        env={"BROKER_CLIENT_TOKEN": CLIENT_TOKEN, "OPENAI_API_KEY": KEY},
    )
    conn = RawConnection(kg.port)
    try:
        conn.send(conn.head("/v1/chat/completions", CLIENT_TOKEN) + BODY)
        status, _, body = conn.response()
        assert status == 200, body
        # Past the first request's deadline: the second must not inherit it.
        time.sleep(1.3)
        conn.send(conn.head("/v1/chat/completions", CLIENT_TOKEN) + BODY)
        status, _, body = conn.response()
        assert status == 200, body

        fake_upstream.hang = True
        conn.send(conn.head("/v1/chat/completions", CLIENT_TOKEN) + BODY)
        status, headers, body = conn.response()
        assert status == 504, body
        assert json.loads(body)["error"]["code"] == "upstream_timeout"
        fake_upstream.hang = False
        if headers.get("connection", "").lower() == "close":
            conn.close()
            conn = RawConnection(kg.port)
        conn.send(conn.head("/v1/chat/completions", CLIENT_TOKEN) + BODY)
        status, _, body = conn.response()
        assert status == 200, body
    finally:
        conn.close()
    assert len(fake_upstream.requests) == 4
