"""A local fake of an OAuth 2.0 provider and of GitHub's App API, checking what the real ones check.

One HTTP server on 127.0.0.1 (ephemeral port) plays three parts:

  POST /oauth/token            RFC 6749 token endpoint. Checks the client (HTTP Basic with the
                               form-encoded id and secret, or `client_id`/`client_secret` in the
                               body), the grant type (only those in `grants`), and for
                               `refresh_token` that the token is the one currently valid: every
                               refresh rotates it and retires the old one, so a reused refresh
                               token gets `invalid_grant`. Issues random access tokens that expire
                               after `expires_in` seconds.
  POST /app/installations/ID/access_tokens
                               GitHub's installation token endpoint. Checks the app JWT: RS256
                               signature against the app's public key, `iss` = the app id, `iat`
                               not in the future, `exp` after now and at most 10 minutes after
                               `iat`, as GitHub does; and the installation id. Records the asked
                               repositories/permissions and issues a `ghs_` token expiring after
                               `gh_expires_in` seconds.
  anything else                the resource server: a Bearer access token or installation token
                               that is currently valid, or `Basic x-access-token:TOKEN` (git over
                               HTTPS), gets 200 and a JSON echo that includes the credential it
                               saw (the canary's worst case); anything else gets 401.

Error answers carry a description that repeats what the client sent (as careless providers do), so
a test can prove keygate never repeats a provider's body.
"""

from __future__ import annotations

import base64
import json
import secrets
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt


def random_token(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(30).replace("-", "a").replace("_", "b")


class FakeTokenServer:
    def __init__(self, *, client_id: str = "keygate-test", client_secret: str | None = None):
        self.client_id = client_id
        self.client_secret = client_secret or random_token("cs-")
        self.grants = {"client_credentials", "refresh_token"}
        self.expires_in = 3600
        self.token_delay = 0.0
        # The refresh token valid now; rotated on every refresh.
        self.refresh_token = random_token("rt-")
        self.issued_refresh_tokens: list[str] = [self.refresh_token]
        self.access_tokens: list[str] = []
        self.valid: set[str] = set()
        self.token_requests: list[dict] = []
        # GitHub App side
        self.app_id = "424242"
        self.installation_id = 777
        self.app_public_key: bytes | None = None
        self.gh_expires_in = 3600
        self.installation_requests: list[dict] = []
        self.installation_tokens: list[str] = []
        # Resource side: what each request presented.
        self.resource_requests: list[dict] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle ---

    def start(self) -> "FakeTokenServer":
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                fake._handle(self)

            def do_GET(self):
                fake._handle(self)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self):
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def revoke_all(self):
        """Every access and installation token issued so far stops working (as after a
        provider-side revocation): the resource server answers 401 to them."""
        with self._lock:
            self.valid.clear()

    def grant_count(self, grant_type: str) -> int:
        with self._lock:
            return sum(1 for r in self.token_requests if r.get("grant_type") == grant_type and r["ok"])

    # --- the three parts ---

    def _handle(self, h: BaseHTTPRequestHandler):
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        path = urllib.parse.urlsplit(h.path).path
        if h.command == "POST" and path == "/oauth/token":
            status, answer = self._token(h, body)
        elif h.command == "POST" and path.startswith("/app/installations/"):
            status, answer = self._installation(h, path, body)
        else:
            status, answer = self._resource(h, path)
        data = json.dumps(answer).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def _token(self, h, body: bytes):
        form = dict(urllib.parse.parse_qsl(body.decode(), keep_blank_values=True))
        if self.token_delay:
            time.sleep(self.token_delay)
        cid, csecret = form.get("client_id"), form.get("client_secret")
        auth = h.headers.get("Authorization", "")
        if auth.startswith("Basic "):
            pair = base64.b64decode(auth[6:]).decode()
            user, _, pw = pair.partition(":")
            cid, csecret = urllib.parse.unquote_plus(user), urllib.parse.unquote_plus(pw)
        record = {"grant_type": form.get("grant_type"), "form": form, "basic": auth.startswith("Basic "), "ok": False}
        with self._lock:
            self.token_requests.append(record)
            if cid != self.client_id or csecret != self.client_secret:
                return 401, {"error": "invalid_client", "error_description": f"client {cid} with secret {csecret} is unknown"}
            grant = form.get("grant_type")
            if grant not in self.grants:
                return 400, {"error": "unsupported_grant_type", "error_description": f"grant {grant} not enabled"}
            answer = {"token_type": "Bearer", "expires_in": self.expires_in}
            if grant == "refresh_token":
                presented = form.get("refresh_token")
                if presented != self.refresh_token:
                    return 400, {"error": "invalid_grant", "error_description": f"refresh token {presented} was already used or is unknown"}
                self.refresh_token = random_token("rt-")
                self.issued_refresh_tokens.append(self.refresh_token)
                answer["refresh_token"] = self.refresh_token
            token = random_token("at-")
            self.access_tokens.append(token)
            self.valid.add(token)
            answer["access_token"] = token
            record["ok"] = True
            return 200, answer

    def _installation(self, h, path: str, body: bytes):
        auth = h.headers.get("Authorization", "")
        record = {"path": path, "ok": False, "body": None, "user_agent": h.headers.get("User-Agent"), "jwt": auth[7:]}
        with self._lock:
            self.installation_requests.append(record)
        if not auth.startswith("Bearer "):
            return 401, {"message": "A JSON web token could not be decoded"}
        token = auth[7:]
        try:
            claims = jwt.decode(
                token,
                self.app_public_key,
                algorithms=["RS256"],
                options={"require": ["iat", "exp", "iss"]},
                leeway=0,
            )
        except jwt.PyJWTError as e:
            return 401, {"message": f"'{token}' could not be decoded: {e}"}
        now = time.time()
        if str(claims["iss"]) != self.app_id:
            return 401, {"message": f"'Issuer' claim ('iss') {claims['iss']} is not this app"}
        if claims["iat"] > now + 1:
            return 401, {"message": "'Issued at' claim ('iat') must be an Integer representing a time in the past."}
        if claims["exp"] - claims["iat"] > 600 + 60 or claims["exp"] <= now:
            return 401, {"message": "'Expiration time' claim ('exp') is too far in the future or past"}
        if path != f"/app/installations/{self.installation_id}/access_tokens":
            return 404, {"message": "Not Found"}
        asked = json.loads(body or b"{}")
        token = random_token("ghs_")
        expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now + self.gh_expires_in))
        with self._lock:
            record.update(ok=True, body=asked, token=token)
            self.installation_tokens.append(token)
            self.valid.add(token)
        answer = {"token": token, "expires_at": expires, "permissions": asked.get("permissions", {"contents": "write"})}
        if "repositories" in asked:
            answer["repositories"] = [{"name": r} for r in asked["repositories"]]
        return 201, answer

    def _resource(self, h, path: str):
        auth = h.headers.get("Authorization", "")
        token = None
        if auth.startswith("Bearer "):
            token = auth[7:]
        elif auth.startswith("Basic "):
            user, _, pw = base64.b64decode(auth[6:]).decode().partition(":")
            token = pw if user == "x-access-token" else None
        with self._lock:
            ok = token is not None and token in self.valid
            self.resource_requests.append({"path": path, "auth": auth, "token": token, "ok": ok})
        if not ok:
            return 401, {"message": f"Bad credentials: {auth}"}
        return 200, {"ok": True, "path": path, "you_sent": auth, "token": token}
