"""A recording fake of the OpenAI and Anthropic HTTP APIs, for keygate's end-to-end tests.

It listens on 127.0.0.1 with an ephemeral port, records every request exactly as it arrived
(method, raw target, path, query, headers in order, body), and answers like the real APIs:

  POST .../chat/completions   OpenAI Chat Completions: JSON, or SSE chunks ending `data: [DONE]`;
                              with `stream_options.include_usage` every chunk carries `"usage": null`
                              and a usage-only chunk (`"choices": []`) precedes `[DONE]`, as the real
                              API does; without it a stream reports no usage
  POST .../responses          OpenAI Responses: JSON, or `event:`/`data:` SSE events
  POST .../messages           Anthropic Messages: JSON, or message_start ... message_stop SSE
  GET  .../models             OpenAI model list
  anything else               a small JSON echo of what was received

A test steers it by setting attributes before it sends requests:

  status           answer every request with this status and an OpenAI-style error body
  hang             answer nothing until the fake is stopped (for upstream timeouts)
  first_event_gate a threading.Event: a stream sends its first event, then waits for the gate before
                   the rest. The test sets the gate only after its client has received that first
                   event, so a proxy that buffers the stream can never deliver it: the gate wait
                   times out, the fake aborts the stream and records the timeout in gate_timeouts.
                   That proves streaming without any timing assertion.
  gzip             compress JSON answers with gzip when the request's Accept-Encoding allows it, as
                   real APIs do (a proxy that redacts must not be blinded by compression)
  deltas           a list of strings: streams send these as their text deltas instead of the default
                   greeting (one event each), as a model streaming token by token would
  raw_body         bytes: non-streamed answers are exactly these bytes (Content-Type JSON), for
                   spellings `json.dumps` would not write
  echo_key         the canary mode: the credential the fake received comes back in response headers,
                   in the JSON body (raw, base64, percent-encoded) and, for streams, inside SSE events
                   whose bytes are cut in the middle of the secret and whose second half is sent only
                   after the client has seen the event before it (gates "n1" and "n2").

The fake is an HTTP/1.1 server with one thread per connection, so it serves keep-alive
connections from a pooled client and hundreds of concurrent requests.
"""

from __future__ import annotations

import base64
import gzip
import json
import socket
import threading
import urllib.parse
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# How long a gated stream waits for the test to open the gate before it gives up. A passing test
# opens it as soon as its client has seen the previous event; this only bounds a failing run.
GATE_TIMEOUT = 10.0


@dataclass(frozen=True)
class Recorded:
    """One request as the upstream received it."""

    method: str
    target: str
    path: str
    query: str
    headers: tuple[tuple[str, str], ...]
    body: bytes

    def header(self, name: str) -> str | None:
        """The first value of header `name` (case-insensitive), or None."""
        values = self.header_values(name)
        return values[0] if values else None

    def header_values(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def header_names(self) -> set[str]:
        return {k.lower() for k, _ in self.headers}

    def json(self):
        return json.loads(self.body)

    def wire_text(self) -> str:
        """Everything the upstream saw, as one string, for 'never contains' checks."""
        head = "\n".join(f"{k}: {v}" for k, v in self.headers)
        return f"{self.method} {self.target}\n{head}\n\n" + self.body.decode("latin-1")


def credential_from(req: Recorded) -> str | None:
    """The credential a request carried: bearer token, x-api-key, or `key` query parameter."""
    auth = req.header("authorization")
    if auth and auth.lower().startswith("bearer "):
        return auth[len("bearer ") :]
    if req.header("x-api-key"):
        return req.header("x-api-key")
    keys = urllib.parse.parse_qs(req.query).get("key")
    return keys[0] if keys else None


class FakeUpstream:
    def __init__(self) -> None:
        self.status: int | None = None
        self.hang = False
        self.first_event_gate: threading.Event | None = None
        self.echo_key = False
        self.gzip = False
        self.deltas: list[str] | None = None
        self.raw_body: bytes | None = None
        self.gates: dict[str, threading.Event] = {"n1": threading.Event(), "n2": threading.Event()}
        self.gate_timeout = GATE_TIMEOUT
        self.gate_timeouts: list[str] = []
        self.echoed: list[str] = []  # credentials the fake has sent back in canary mode
        self._requests: list[Recorded] = []
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.fake = self
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-upstream", daemon=True
        )

    # === lifecycle ===

    def serve_tls(self, context) -> "FakeUpstream":
        """Speak TLS with `context` (an `ssl.SSLContext` with its certificate); call before start."""
        self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self.tls = True
        return self

    def start(self) -> "FakeUpstream":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        for gate in self.gates.values():
            gate.set()
        if self.first_event_gate is not None:
            self.first_event_gate.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=GATE_TIMEOUT)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        scheme = "https" if getattr(self, "tls", False) else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    # === what it saw ===

    @property
    def requests(self) -> list[Recorded]:
        with self._lock:
            return list(self._requests)

    def _record(self, req: Recorded) -> None:
        with self._lock:
            self._requests.append(req)

    def _wait_gate(self, name: str, gate: threading.Event) -> bool:
        if gate.wait(self.gate_timeout) and not self._stopped.is_set():
            return True
        with self._lock:
            self.gate_timeouts.append(name)
        return False


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # the concurrency test opens many connections at once
    fake: FakeUpstream


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fake-upstream/1"
    timeout = 30  # idle keep-alive connections end on their own
    server: _Server

    def log_message(self, format, *args):  # noqa: A002 - quiet; the test reads .requests
        pass

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            body = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return body
                body += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self) -> None:
        fake = self.server.fake
        body = self._read_body()
        split = urllib.parse.urlsplit(self.path)
        req = Recorded(
            method=self.command,
            target=self.path,
            path=split.path,
            query=split.query,
            headers=tuple(self.headers.items()),
            body=body,
        )
        fake._record(req)

        if fake.hang:
            fake._stopped.wait()
            self.close_connection = True
            return
        if fake.status is not None:
            self._send_json(
                fake.status,
                {"error": {"message": "fake upstream error", "type": "fake_error", "code": fake.status}},
            )
            return
        try:
            payload = json.loads(body) if body else {}
        except ValueError:
            payload = {}
        stream = isinstance(payload, dict) and payload.get("stream") is True

        text = fake.deltas or CHAT_TEXT
        if fake.raw_body is not None and not stream:
            self._send_raw(fake.raw_body)
        elif fake.echo_key:
            self._echo_key(req, stream)
        elif req.path.endswith("/chat/completions"):
            self._sse(_chat_events(_include_usage(payload), text), openai=True) if stream else self._send_json(200, _chat_json(payload))
        elif req.path.endswith("/responses"):
            self._sse(_responses_events(text)) if stream else self._send_json(200, _responses_json())
        elif req.path.endswith("/messages"):
            self._sse(_anthropic_events(text)) if stream else self._send_json(200, _anthropic_json())
        elif req.path.endswith("/models"):
            self._send_json(200, {"object": "list", "data": [{"id": "gpt-fake", "object": "model", "created": 0, "owned_by": "fake"}]})
        else:
            self._send_json(200, {"ok": True, "method": req.method, "path": req.path, "query": req.query})

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _handle

    # === answers ===

    def _send_json(self, status: int, obj, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if self.server.fake.gzip and "gzip" in (self.headers.get("Accept-Encoding") or "").lower():
            data = gzip.compress(data)
            self.send_header("Content-Encoding", "gzip")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        self.wfile.flush()

    def _send_raw(self, data: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()

    def _start_stream(self, headers: dict[str, str] | None = None) -> None:
        self.send_response(200)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _end_stream(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _abort(self) -> None:
        """Cut the connection mid-stream so the client sees an incomplete response."""
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _sse(self, events: list[bytes], openai: bool = False) -> None:
        fake = self.server.fake
        self._start_stream()
        for i, event in enumerate(events):
            self._chunk(event)
            if i == 0 and fake.first_event_gate is not None:
                if not fake._wait_gate("first_event", fake.first_event_gate):
                    self._abort()
                    return
        if openai:
            self._chunk(b"data: [DONE]\n\n")
        self._end_stream()

    def _echo_key(self, req: Recorded, stream: bool) -> None:
        fake = self.server.fake
        key = credential_from(req) or ""
        b64 = base64.b64encode(key.encode()).decode()
        pct = urllib.parse.quote(key, safe="")
        with fake._lock:
            fake.echoed.append(key)
        headers = {"X-Echo-Key": key, "X-Echo-Key-B64": b64, "X-Echo-Key-Pct": pct}
        if not stream:
            self._send_json(
                200,
                {
                    "echo": {"raw": key, "b64": b64, "pct": pct},
                    "text": f"the key you sent me was {key} (base64 {b64})",
                },
                headers,
            )
            return
        # Each write below is one HTTP chunk. The first ends in the middle of the raw secret and
        # is released only as a whole, so keygate must see the secret cut across two reads; the
        # second half follows only once the client has seen event n1, i.e. keygate has streamed
        # what came before the secret while holding back its first half.
        h1, h2 = len(key) // 2, len(b64) // 2
        pieces: list[bytes | str] = [
            f'data: {{"n":1}}\n\ndata: {{"leak":"{key[:h1]}'.encode(),
            "n1",
            f'{key[h1:]}"}}\n\ndata: {{"n":2}}\n\ndata: {{"leak_b64":"{b64[:h2]}'.encode(),
            "n2",
            f'{b64[h2:]}"}}\n\ndata: {{"leak_pct":"{pct}"}}\n\ndata: {{"n":3}}\n\ndata: [DONE]\n\n'.encode(),
        ]
        self._start_stream(headers)
        for piece in pieces:
            if isinstance(piece, str):
                if not fake._wait_gate(piece, fake.gates[piece]):
                    self._abort()
                    return
            else:
                self._chunk(piece)
        self._end_stream()


# === realistic API payloads ===

CHAT_TEXT = ["Hello", " from", " the", " fake", " upstream"]
CHAT_USAGE = {"prompt_tokens": 9, "completion_tokens": 5, "total_tokens": 14}


def _sse_data(obj) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def _sse_event(name: str, obj) -> bytes:
    return f"event: {name}\n".encode() + _sse_data(obj)


def _chat_json(payload) -> dict:
    model = payload.get("model", "gpt-fake") if isinstance(payload, dict) else "gpt-fake"
    return {
        "id": "chatcmpl-fake1",
        "object": "chat.completion",
        "created": 1700000000,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "".join(CHAT_TEXT), "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": dict(CHAT_USAGE),
    }


def _include_usage(payload) -> bool:
    options = payload.get("stream_options") if isinstance(payload, dict) else None
    return isinstance(options, dict) and options.get("include_usage") is True


def _chat_events(include_usage: bool = False, text: list[str] = CHAT_TEXT) -> list[bytes]:
    def chunk(delta, finish=None):
        obj = {
            "id": "chatcmpl-fake1",
            "object": "chat.completion.chunk",
            "created": 1700000000,
            "model": "gpt-fake",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if include_usage:
            obj["usage"] = None
        return _sse_data(obj)

    events = [chunk({"role": "assistant", "content": ""})] + [chunk({"content": t}) for t in text] + [chunk({}, "stop")]
    if include_usage:
        events.append(
            _sse_data(
                {
                    "id": "chatcmpl-fake1",
                    "object": "chat.completion.chunk",
                    "created": 1700000000,
                    "model": "gpt-fake",
                    "choices": [],
                    "usage": CHAT_USAGE,
                }
            )
        )
    return events


def _response_obj(status: str, text: str | None) -> dict:
    output = []
    if text is not None:
        output = [
            {
                "type": "message",
                "id": "msg_fake1",
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}],
            }
        ]
    return {
        "id": "resp_fake1",
        "object": "response",
        "created_at": 1700000000,
        "status": status,
        "model": "gpt-fake",
        "output": output,
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "usage": {
            "input_tokens": 9,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": 5,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": 14,
        },
    }


def _responses_json(text: list[str] = CHAT_TEXT) -> dict:
    return _response_obj("completed", "".join(text))


def _responses_events(text: list[str] = CHAT_TEXT) -> list[bytes]:
    seq = iter(range(1000))
    item = {"type": "message", "id": "msg_fake1", "status": "in_progress", "role": "assistant", "content": []}
    done_item = _responses_json(text)["output"][0]
    events = [
        _sse_event("response.created", {"type": "response.created", "sequence_number": next(seq), "response": _response_obj("in_progress", None)}),
        # The item and part events real clients (Codex CLI) need before text deltas.
        _sse_event("response.output_item.added", {"type": "response.output_item.added", "sequence_number": next(seq), "output_index": 0, "item": item}),
        _sse_event(
            "response.content_part.added",
            {"type": "response.content_part.added", "sequence_number": next(seq), "item_id": "msg_fake1", "output_index": 0,
             "content_index": 0, "part": {"type": "output_text", "text": "", "annotations": []}},
        ),
    ]
    for t in text:
        events.append(
            _sse_event(
                "response.output_text.delta",
                {
                    "type": "response.output_text.delta",
                    "sequence_number": next(seq),
                    "item_id": "msg_fake1",
                    "output_index": 0,
                    "content_index": 0,
                    "delta": t,
                    "logprobs": [],
                },
            )
        )
    events.append(
        _sse_event("response.output_item.done", {"type": "response.output_item.done", "sequence_number": next(seq), "output_index": 0, "item": done_item})
    )
    events.append(
        _sse_event("response.completed", {"type": "response.completed", "sequence_number": next(seq), "response": _responses_json(text)})
    )
    return events


def _anthropic_json() -> dict:
    return {
        "id": "msg_fake1",
        "type": "message",
        "role": "assistant",
        "model": "claude-fake",
        "content": [{"type": "text", "text": "".join(CHAT_TEXT)}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 9, "output_tokens": 5},
    }


def _anthropic_events(text: list[str] = CHAT_TEXT) -> list[bytes]:
    start = dict(_anthropic_json(), content=[], stop_reason=None, usage={"input_tokens": 9, "output_tokens": 1})
    events = [
        _sse_event("message_start", {"type": "message_start", "message": start}),
        _sse_event("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        _sse_event("ping", {"type": "ping"}),
    ]
    for t in text:
        events.append(
            _sse_event("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": t}})
        )
    events += [
        _sse_event("content_block_stop", {"type": "content_block_stop", "index": 0}),
        _sse_event(
            "message_delta",
            {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None}, "usage": {"output_tokens": 5}},
        ),
        _sse_event("message_stop", {"type": "message_stop"}),
    ]
    return events
