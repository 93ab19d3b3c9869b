"""The forward proxy (`proxy_listen`) with real curl: a host a route names is served through
keygate's own CA and the same pipeline as the reverse proxy; other hosts are tunnelled only when
allowed; every CONNECT is audited, refusals included."""

from __future__ import annotations

import base64
import json
import socket
import ssl
import time

import pytest

from conftest import DEADLINE, error_code, raw_request, run_keygate
from fake_upstream import credential_from
from proxy_setup import HOST, MIRROR, start_bench, status_of


@pytest.fixture
def bench(keygate, keygate_bin, tmp_path):
    b = start_bench(keygate, keygate_bin, tmp_path)
    yield b
    b.upstream.stop()
    b.mirror.stop()


def connects(kg, n: int = 1) -> list[dict]:
    """The CONNECT records, once there are at least `n` records of any kind."""
    return [r for r in kg.audit_records(n) if r["method"] == "CONNECT"]


def test_curl_through_the_proxy_gets_the_upstream_real_key_and_the_agent_never_sees_it(bench):
    bench.upstream.echo_key = True
    done = bench.curl(f"https://{HOST}/echo")
    code, connect, body = status_of(done)
    assert (code, connect) == (200, 200), done.stderr
    assert credential_from(bench.upstream.requests[-1]) == bench.key
    assert bench.upstream.requests[-1].header("host") == HOST
    assert bench.key not in done.stdout and bench.key not in done.stderr
    assert "[REDACTED:" in body
    recs = bench.kg.audit_records(2)
    inner = [r for r in recs if r["method"] == "GET"]
    assert len(inner) == 1 and inner[0]["route"] == "gh" and inner[0]["decision"] == "allow"
    assert inner[0]["destination"] == HOST
    (tunnel,) = connects(bench.kg, 2)
    assert tunnel["reason"] == "tunnel_terminated" and tunnel["path"] == f"{HOST}:443"
    assert tunnel["agent"] == "coder" and tunnel["destination"] == HOST


def test_requests_in_one_tunnel_are_each_authorized_and_audited(bench):
    # Two URLs in one curl run share one tunnel (keep-alive); the second is not allowed.
    done = bench.curl(f"https://{HOST}/user", f"https://{HOST}/admin")
    assert "path_not_allowed" in done.stdout, done.stdout
    recs = bench.kg.audit_records(3)
    inner = sorted((r["path"], r["decision"]) for r in recs if r["method"] == "GET")
    assert inner == [("/admin", "deny"), ("/user", "allow")]
    assert len(connects(bench.kg, 3)) == 1


def test_proxy_without_credentials_gets_407_and_the_token_as_password_or_bearer_passes(bench):
    # Without credentials only a route's host is terminated (placeholder identity, see
    # test_proxy_tools.py); a tunnel host is 407.
    done = bench.curl(f"https://{MIRROR}/user", token=None, cacert=bench.upstream_ca)
    assert status_of(done)[1] == 407
    resp = raw_request(bench.proxy_port, f"CONNECT {MIRROR}:443 HTTP/1.1\nHost: {MIRROR}:443")
    assert resp.status == 407 and "basic" in resp.headers["proxy-authenticate"].lower()
    assert error_code(resp) == "proxy_auth_required"
    bad = bench.curl(f"https://{HOST}/user", token="kg_" + "x" * 40)
    assert status_of(bad)[1] == 407
    # Benign neighbours: the token as Basic password (what HTTPS_PROXY=http://u:TOKEN@ sends) works.
    assert status_of(bench.curl(f"https://{HOST}/user"))[:2] == (200, 200)
    denied = [r for r in connects(bench.kg, 5) if r["decision"] == "deny"]
    assert len(denied) == 3 and all(r["reason"] == "proxy_auth_required" for r in denied)


@pytest.mark.parametrize(
    "target, code",
    [
        (f"{HOST}:22", "connect_port_not_allowed"),
        ("127.0.0.1:443", "connect_ip_literal"),
        ("[::1]:443", "connect_ip_literal"),
        ("localhost:443", "connect_to_keygate"),
        ("no-route.example.test:443", "egress_denied"),
        ("bad_host..example:443", "connect_bad_authority"),
    ],
)
def test_connect_attacks_are_refused_and_audited(bench, target, code):
    auth = base64.b64encode(f"keygate:{bench.token}".encode()).decode()
    resp = raw_request(bench.proxy_port, f"CONNECT {target} HTTP/1.1\nHost: {target}\nProxy-Authorization: Basic {auth}")
    assert error_code(resp) == code, resp.body
    (rec,) = connects(bench.kg)
    assert rec["decision"] == "deny" and rec["reason"] == code and rec["agent"] == "coder"


def test_allowlisted_name_pointing_at_keygate_itself_is_refused(keygate, keygate_bin, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    b = start_bench(keygate, keygate_bin, tmp_path, listen_port=port, mirror_at=f"127.0.0.1:{port}")
    try:
        auth = base64.b64encode(f"keygate:{b.token}".encode()).decode()
        resp = raw_request(b.proxy_port, f"CONNECT {MIRROR}:443 HTTP/1.1\nHost: {MIRROR}:443\nProxy-Authorization: Basic {auth}")
        assert error_code(resp) == "connect_to_keygate", resp.body
        (rec,) = connects(b.kg)
        assert rec["reason"] == "connect_to_keygate"
    finally:
        b.upstream.stop()
        b.mirror.stop()


def test_allowlisted_host_is_tunnelled_without_inspection(bench):
    # The client checks the mirror's own certificate (the test CA), so keygate did not terminate.
    done = bench.curl(f"https://{MIRROR}/anything", cacert=bench.upstream_ca)
    code, connect, body = status_of(done)
    assert (code, connect) == (200, 200), done.stderr
    assert json.loads(body)["path"] == "/anything"
    assert credential_from(bench.mirror.requests[-1]) is None
    (rec,) = connects(bench.kg)
    assert rec["reason"] == "tunnel_passed" and rec["destination"] == MIRROR
    # No request record for what passed through: keygate did not read it.
    assert [r for r in bench.kg.audit_records() if r["method"] != "CONNECT"] == []


def test_wrong_upstream_certificate_is_502(keygate, keygate_bin, tmp_path):
    b = start_bench(keygate, keygate_bin, tmp_path, wrong_ca=True)
    try:
        done = b.curl(f"https://{HOST}/user")
        code, connect, body = status_of(done)
        assert (code, connect) == (502, 200), done.stderr
        assert json.loads(body)["error"]["code"] == "upstream_certificate_invalid"
        assert b.upstream.requests == []
    finally:
        b.upstream.stop()
        b.mirror.stop()


def test_absolute_form_http_goes_through_the_pipeline_for_a_route_host_only(bench):
    done = bench.curl(f"http://{HOST}/user")
    assert status_of(done)[0] == 200, done.stdout
    assert credential_from(bench.upstream.requests[-1]) == bench.key
    other = bench.curl("http://elsewhere.example.test/")
    assert status_of(other)[0] == 403 and "egress_denied" in other.stdout
    recs = bench.kg.audit_records(2)
    assert sorted(r["decision"] for r in recs) == ["allow", "deny"]


def _tls_in_tunnel(bench, sni: str) -> bool:
    """CONNECT to the route's host, then a TLS handshake naming `sni`; whether it completed."""
    import ssl

    auth = base64.b64encode(f"keygate:{bench.token}".encode()).decode()
    with socket.create_connection(("127.0.0.1", bench.proxy_port), timeout=10) as s:
        s.sendall(f"CONNECT {HOST}:443 HTTP/1.1\r\nHost: {HOST}:443\r\nProxy-Authorization: Basic {auth}\r\n\r\n".encode())
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            chunk = s.recv(1)
            assert chunk, head
            head += chunk
        assert head.startswith(b"HTTP/1.1 200"), head
        ctx = ssl.create_default_context(cafile=str(bench.keygate_ca))
        ctx.check_hostname = False  # keygate is the one that must check the name here
        try:
            with ctx.wrap_socket(s, server_hostname=sni):
                return True
        except (ssl.SSLError, OSError):
            return False


def test_tls_inside_a_tunnel_must_name_the_connect_host(bench):
    assert not _tls_in_tunnel(bench, "other.example.test")
    (rec,) = connects(bench.kg)
    assert rec["decision"] == "deny" and rec["reason"] == "tunnel_handshake_failed"
    # Benign neighbour: the CONNECT's own host completes the handshake.
    assert _tls_in_tunnel(bench, HOST)
    recs = connects(bench.kg, 2)
    assert sorted(r["reason"] for r in recs) == ["tunnel_handshake_failed", "tunnel_terminated"]


def test_idle_connections_without_a_token_cannot_lock_agents_out_of_the_proxy(bench):
    # A local process holding nothing can fill every proxy connection slot with idle sockets;
    # the longest-idle one is closed to make room, so an agent's CONNECT is still answered.
    held = []
    try:
        for _ in range(530):  # more than the listener's 512 slots
            s = socket.create_connection(("127.0.0.1", bench.proxy_port), timeout=5)
            held.append(s)
        done = bench.curl(f"https://{HOST}/user")
        assert status_of(done)[:2] == (200, 200), done
        # Evicted sockets were closed by keygate (read gives EOF), not left half-open.
        closed = 0
        for s in held[:40]:
            s.settimeout(2)
            try:
                if s.recv(1) == b"":
                    closed += 1
            except (TimeoutError, OSError):
                pass
        assert closed > 0
    finally:
        for s in held:
            s.close()


def _blind_tunnel(b) -> socket.socket:
    """A CONNECT to the allowlisted mirror (passed through, not terminated), 200 read."""
    auth = base64.b64encode(f"keygate:{b.token}".encode()).decode()
    s = socket.create_connection(("127.0.0.1", b.proxy_port), timeout=DEADLINE)
    s.sendall(f"CONNECT {MIRROR}:443 HTTP/1.1\r\nHost: {MIRROR}:443\r\nProxy-Authorization: Basic {auth}\r\n\r\n".encode())
    head = _read_head(s)
    assert head.startswith(b"HTTP/1.1 200"), head
    return s


def _read_head(s) -> bytes:
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(4096)
        assert chunk, head
        head += chunk
    return head


def _status_of_get(tls: ssl.SSLSocket, path: str) -> int:
    tls.sendall(f"GET {path} HTTP/1.1\r\nHost: {MIRROR}\r\nContent-Length: 0\r\n\r\n".encode())
    return int(_read_head(tls).split(b" ", 2)[1])


def _closed(tls: ssl.SSLSocket) -> bool:
    """Reads until the tunnel ends; False if it is still open after DEADLINE."""
    tls.settimeout(DEADLINE)
    try:
        while tls.recv(65536):
            pass
    except (ConnectionResetError, ssl.SSLError, BrokenPipeError):
        pass
    except TimeoutError:
        return False
    return True


def test_a_passed_through_tunnel_is_closed_when_its_agent_is_frozen(bench, keygate_bin):
    # keygate reads nothing in a passed-through tunnel, so no request in it can be refused: the
    # tunnel itself must end when its caller loses the right to it.
    ctx = ssl.create_default_context(cafile=str(bench.upstream_ca))
    with ctx.wrap_socket(_blind_tunnel(bench), server_hostname=MIRROR) as tls:
        # Benign: past several re-checks, a tunnel whose caller is still allowed is still open.
        time.sleep(2.5)
        assert _status_of_get(tls, "/first") == 200
        frozen = run_keygate(keygate_bin, ["freeze", "--agent", "coder", "--config", str(bench.kg.config_path)], bench.tmp)
        assert frozen.returncode == 0, frozen.stderr
        assert _closed(tls), "the tunnel stayed open after its agent was frozen"
    assert [r.path for r in bench.mirror.requests] == ["/first"]
