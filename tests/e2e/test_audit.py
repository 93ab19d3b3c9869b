"""The audit log: one complete JSON record per request, hash-chained, tied to the answer by
x-request-id, correct under 500 concurrent requests; and when it cannot be written, keygate fails
closed."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx

from conftest import DEADLINE, error_code, fake_secret, lab_config, native_config, new_token, poll, run_keygate

CLIENT_TOKEN = fake_secret("lab-client-")
KEY = fake_secret("sk-proj-audit")
CHAT_BODY = {"model": "gpt-fake", "messages": [{"role": "user", "content": "hi"}]}
AUTH = {"Authorization": f"Bearer {CLIENT_TOKEN}"}

FIELDS = {
    "time", "request_id", "agent", "person", "route", "destination", "method", "path", "classification",
    "policy_version", "decision", "reason", "status", "key_id", "latency_ms", "bytes_in", "bytes_out",
    "prev_hash", "hash",
}


def start_proxy(keygate, fake_upstream, **kw):
    return keygate(
        lab_config("env.example", fake_upstream.url),
        env={"BROKER_CLIENT_TOKEN": CLIENT_TOKEN, "OPENAI_API_KEY": KEY},
        **kw,
    )


def assert_chain_links(records: list[dict]) -> None:
    for n in range(1, len(records)):
        assert records[n]["prev_hash"] == records[n - 1]["hash"], f"hash chain broken between records {n} and {n + 1}"
    hashes = [r["hash"] for r in records]
    assert len(set(hashes)) == len(hashes), "two records share a hash"


def test_allowed_request_record_has_every_field_and_matches_the_answer(keygate, fake_upstream):
    kg = start_proxy(keygate, fake_upstream)
    with kg.client() as c:
        r = c.post("/v1/chat/completions", json=CHAT_BODY, headers=AUTH)

    assert r.status_code == 200
    (record,) = kg.audit_records(n=1)
    assert FIELDS <= set(record), f"missing audit fields: {FIELDS - set(record)}"
    assert record["request_id"] == r.headers["x-request-id"]
    assert (record["decision"], record["status"], record["method"], record["path"]) == (
        "allow", 200, "POST", "/v1/chat/completions",
    )
    assert record["destination"] in ("127.0.0.1", f"127.0.0.1:{fake_upstream.port}")
    # Whichever way round keygate counts them, the two sizes are the request and the answer body.
    assert {record["bytes_in"], record["bytes_out"]} == {len(fake_upstream.requests[0].body), len(r.content)}
    assert isinstance(record["latency_ms"], (int, float)) and record["latency_ms"] >= 0
    assert KEY not in json.dumps(record) and CLIENT_TOKEN not in json.dumps(record)


def test_refused_request_is_audited_with_its_request_id(keygate, fake_upstream):
    kg = start_proxy(keygate, fake_upstream)
    with kg.client() as c:
        r = c.post("/v1/chat/completions", json=CHAT_BODY)  # no token

    assert r.status_code == 401
    assert r.json()["error"]["request_id"] == r.headers["x-request-id"]
    (record,) = kg.audit_records(n=1)
    assert FIELDS <= set(record), f"missing audit fields: {FIELDS - set(record)}"
    assert (record["request_id"], record["decision"], record["status"]) == (r.headers["x-request-id"], "deny", 401)


def test_healthz_answer_carries_a_request_id_too(keygate, fake_upstream):
    kg = start_proxy(keygate, fake_upstream)
    with kg.client() as c:
        r = c.get("/healthz")
    assert r.status_code == 200
    assert r.headers.get("x-request-id")


def test_500_concurrent_requests_give_500_chained_records(keygate, fake_upstream):
    kg = start_proxy(keygate, fake_upstream)
    total = 500

    with httpx.Client(
        base_url=kg.url, timeout=DEADLINE * 3, trust_env=False, limits=httpx.Limits(max_connections=32)
    ) as c:

        def one(i: int) -> tuple[int, str]:
            r = c.post("/v1/chat/completions", json=dict(CHAT_BODY, user=f"req-{i}"), headers=AUTH)
            return r.status_code, r.headers["x-request-id"]

        with ThreadPoolExecutor(max_workers=32) as pool:
            results = list(pool.map(one, range(total)))

    assert [status for status, _ in results] == [200] * total
    answered_ids = {rid for _, rid in results}
    assert len(answered_ids) == total, "x-request-id values repeat"
    assert len(fake_upstream.requests) == total

    records = kg.audit_records(n=total, timeout=DEADLINE * 3)
    assert len(records) == total, f"{len(records)} audit lines for {total} requests"
    assert {r["request_id"] for r in records} == answered_ids
    assert all(r["decision"] == "allow" and r["status"] == 200 for r in records)
    assert_chain_links(kg.audit_log())
    assert kg.audit_path.read_text().endswith("\n")


def test_allowed_and_refused_records_share_one_chain(keygate, fake_upstream):
    kg = start_proxy(keygate, fake_upstream)
    with kg.client() as c:
        for headers in (AUTH, {}, AUTH, {"Authorization": "Bearer nope"}, AUTH):
            c.post("/v1/chat/completions", json=CHAT_BODY, headers=headers)

    records = kg.audit_records(n=5)
    assert [r["decision"] for r in records] == ["allow", "deny", "allow", "deny", "allow"]
    assert_chain_links(kg.audit_log())


def test_audit_write_failure_makes_keygate_refuse_with_503_and_keep_refusing(keygate, fake_upstream):
    """/dev/full accepts the open and fails every write with ENOSPC. Once keygate has met the
    failure it refuses with audit_unavailable, every time, and stays up."""
    kg = start_proxy(keygate, fake_upstream, audit_log="/dev/full")
    with kg.client() as c:
        post = lambda: c.post("/v1/chat/completions", json=CHAT_BODY, headers=AUTH)  # noqa: E731
        first_refusal = poll(lambda: (r := post()).status_code == 503 and r, "a 503 from keygate")
        later = [post() for _ in range(3)]

    for r in (first_refusal, *later):
        assert r.status_code == 503, r.text
        assert error_code(r) == "audit_unavailable"
    assert kg.alive()


def test_audit_write_failure_forwards_nothing_upstream(keygate, fake_upstream):
    """Fail closed: no use of the credential goes unrecorded, not even the first request (keygate
    must find out that its log is unwritable before it forwards anything)."""
    kg = start_proxy(keygate, fake_upstream, audit_log="/dev/full")
    with kg.client() as c:
        c.post("/v1/chat/completions", json=CHAT_BODY, headers=AUTH)
        c.post("/v1/chat/completions", json=CHAT_BODY, headers=AUTH)

    assert fake_upstream.requests == [], "keygate used the credential while it could not audit"


def test_log_opens_with_a_start_record_closes_with_stop_and_verifies(keygate, keygate_bin, fake_upstream, tmp_path):
    """keygate writes (and waits for) a start record before serving, so a log it cannot write is
    known before any request; the chain over start, requests and stop verifies with
    `keygate audit verify`, and an edited line is caught."""
    kg = start_proxy(keygate, fake_upstream)
    with kg.client() as c:
        c.post("/v1/chat/completions", json=CHAT_BODY, headers=AUTH)
        c.post("/v1/chat/completions", json=CHAT_BODY, headers={})
    kg.audit_records(n=2)
    kg.stop()
    log = kg.audit_log()
    assert [r.get("event") for r in log] == ["start", None, None, "stop"]
    assert log[0]["policy_version"] == log[1]["policy_version"]
    assert "request_id" not in log[0]
    assert_chain_links(log)

    ok = subprocess.run([str(keygate_bin), "audit", "verify", str(kg.audit_path)], capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    tampered = tmp_path / "tampered.jsonl"
    tampered.write_text(kg.audit_path.read_text().replace('"status":401', '"status":200'))
    bad = subprocess.run([str(keygate_bin), "audit", "verify", str(tampered)], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 1 and ":3:" in bad.stdout, bad.stdout + bad.stderr


# === a log that can be trusted: anchors, cut ends, signatures ===


def verify(keygate_bin, path, *args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(keygate_bin), "audit", "verify", str(path), *args], capture_output=True, text=True, timeout=30
    )


def recompute_hashes(lines: list[str], edit_line: int, old: str, new: str) -> list[str]:
    """What someone who can write the log but holds no key can do: change a line and recompute
    every hash from there on (signatures are kept as they were; they cannot be remade)."""
    out, prev = [], None
    for n, line in enumerate(lines, start=1):
        body, rest = line[: line.rindex(',"prev_hash":')], line[line.rindex(',"prev_hash":') :]
        sig = json.loads("{" + rest[1:]).get("sig")
        if n == edit_line:
            assert old in body
            body = body.replace(old, new)
        prev = prev or json.loads(line)["prev_hash"]
        unhashed = f'{body},"prev_hash":"{prev}"}}'
        digest = hashlib.sha256(unhashed.encode()).hexdigest()
        line = f'{unhashed[:-1]},"hash":"{digest}"' + (f',"sig":"{sig}"' if sig else "") + "}"
        out.append(line)
        prev = digest
    return out


def signed_keygate(keygate, fake_upstream, tmp_path):
    token = new_token()
    state = tmp_path / "state"
    config = f'state_dir = "{state}"\n' + native_config(fake_upstream.url, agent_routes=("openai",))
    kg = keygate(config, env={"KEYGATE_AGENT_TOKEN": token, "OPENAI_API_KEY": fake_secret("sk-proj-sig"), "ANTHROPIC_API_KEY": fake_secret("sk-ant-sig")})
    return kg, token, state


def test_signed_log_verifies_with_the_printed_key_and_an_edit_with_recomputed_hashes_fails(
    keygate, keygate_bin, fake_upstream, tmp_path
):
    kg, token, state = signed_keygate(keygate, fake_upstream, tmp_path)
    with kg.client() as c:
        for i in range(3):
            r = c.post("/openai/v1/chat/completions", json=dict(CHAT_BODY, user=f"u{i}"), headers={"Authorization": f"Bearer {token}"})
            assert r.status_code == 200, r.text
        assert c.post("/openai/v1/chat/completions", json=CHAT_BODY).status_code == 401
    kg.audit_records(n=4)
    assert kg.stop() == 0

    key_file = state / "audit.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    printed = run_keygate(keygate_bin, ["audit", "key", "--config", str(kg.config_path)], tmp_path)
    assert printed.returncode == 0, printed.stderr
    public = printed.stdout.strip()
    assert len(public) == 64 and public not in key_file.read_text()

    log = kg.audit_log()
    assert [r.get("event") for r in log] == ["start", None, None, None, None, "stop"]
    assert log[0]["sig"] and log[-1]["sig"] and "sig" not in log[1]

    ok = verify(keygate_bin, kg.audit_path, "--key", public, "--strict")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "2 signatures hold" in ok.stdout, ok.stdout

    # The denied request (line 5) rewritten as allowed, every hash after it recomputed.
    forged = tmp_path / "forged.jsonl"
    lines = kg.audit_lines()
    forged.write_text("\n".join(recompute_hashes(lines, 5, '"status":401', '"status":200')) + "\n")
    unsigned_view = verify(keygate_bin, forged)
    assert unsigned_view.returncode == 0, "the hash chain alone cannot see a recomputed edit"
    caught = verify(keygate_bin, forged, "--key", public)
    assert caught.returncode == 1, caught.stdout + caught.stderr
    assert ":6:" in caught.stdout and "5..6" not in caught.stdout and "2..6" in caught.stdout, caught.stdout

    other_key = "11" * 32
    wrong = verify(keygate_bin, kg.audit_path, "--key", other_key)
    assert wrong.returncode == 1 and ":1:" in wrong.stdout, wrong.stdout
    assert verify(keygate_bin, kg.audit_path, "--key", "not-a-key").returncode == 2


def test_audit_key_readable_by_others_is_refused_by_serve_and_audit_key(keygate, keygate_bin, fake_upstream, tmp_path):
    kg, token, state = signed_keygate(keygate, fake_upstream, tmp_path)
    kg.stop()
    key = state / "audit.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    key.chmod(0o644)

    printed = run_keygate(keygate_bin, ["audit", "key", "--config", str(kg.config_path)], tmp_path)
    assert printed.returncode == 2 and "readable by other users" in printed.stderr, printed.stderr
    assert printed.stdout == ""
    served = run_keygate(
        keygate_bin,
        ["serve", "--config", str(kg.config_path), "--audit-log", str(tmp_path / "x.jsonl")],
        tmp_path,
        env={"KEYGATE_AGENT_TOKEN": token, "OPENAI_API_KEY": fake_secret("sk-proj-sig"), "ANTHROPIC_API_KEY": fake_secret("sk-ant-sig")},
    )
    assert served.returncode == 2 and "audit signing key" in served.stderr, served.stderr


def test_verify_reports_a_cut_tail_and_needs_an_anchor_for_a_cut_head(keygate, keygate_bin, fake_upstream, tmp_path):
    kg = start_proxy(keygate, fake_upstream)
    with kg.client() as c:
        for _ in range(3):
            c.post("/v1/chat/completions", json=CHAT_BODY, headers=AUTH)
    kg.audit_records(n=3)
    assert kg.stop() == 0
    lines = kg.audit_lines()
    assert len(lines) == 5

    whole = verify(keygate_bin, kg.audit_path, "--strict")
    assert whole.returncode == 0 and "closed by a stop record" in whole.stdout, whole.stdout

    tail_cut = tmp_path / "tail-cut.jsonl"
    tail_cut.write_text("\n".join(lines[:4]) + "\n")
    lenient = verify(keygate_bin, tail_cut)
    assert lenient.returncode == 0 and "not closed" in lenient.stdout and "lines 2..4" in lenient.stdout, lenient.stdout
    strict = verify(keygate_bin, tail_cut, "--strict", "--json")
    assert strict.returncode == 1 and json.loads(strict.stdout)["ok"] is False, strict.stdout

    mid_line = tmp_path / "mid-line.jsonl"
    mid_line.write_text("\n".join(lines[:4]) + "\n" + lines[4][:30])
    cut = verify(keygate_bin, mid_line)
    assert cut.returncode == 0 and "line 5 is incomplete" in cut.stdout, cut.stdout

    # keygate restarted on that log begins a new line and goes on from the last intact record.
    restarted = start_proxy(keygate, fake_upstream, audit_log=mid_line)
    with restarted.client() as c:
        r = c.post("/v1/chat/completions", json=CHAT_BODY, headers=AUTH)
    assert r.status_code == 200
    poll(lambda: r.headers["x-request-id"] in mid_line.read_text(), "the new run's record")
    assert restarted.stop() == 0
    resumed = verify(keygate_bin, mid_line)
    assert resumed.returncode == 0 and ":5: cut mid-write by a crash" in resumed.stdout, resumed.stdout
    assert verify(keygate_bin, mid_line, "--strict").returncode == 1

    head_cut = tmp_path / "head-cut.jsonl"
    head_cut.write_text("\n".join(lines[2:]) + "\n")
    unanchored = verify(keygate_bin, head_cut)
    assert unanchored.returncode == 1 and ":1:" in unanchored.stdout and "start record" in unanchored.stdout
    anchor = json.loads(lines[1])["hash"]
    anchored = verify(keygate_bin, head_cut, "--from-hash", anchor, "--strict")
    assert anchored.returncode == 0, anchored.stdout
    wrong_anchor = verify(keygate_bin, head_cut, "--from-hash", "ab" * 32)
    assert wrong_anchor.returncode == 1, wrong_anchor.stdout
    assert verify(keygate_bin, head_cut, "--no-such-flag").returncode == 2


def test_rotated_log_and_its_successor_verify_each_on_their_own(keygate, keygate_bin, fake_upstream, tmp_path):
    audit = tmp_path / "events.jsonl"
    for _ in range(2):
        kg = start_proxy(keygate, fake_upstream, audit_log=audit)
        with kg.client() as c:
            assert c.post("/v1/chat/completions", json=CHAT_BODY, headers=AUTH).status_code == 200
        kg.audit_records(n=1)
        assert kg.stop() == 0
        if not (tmp_path / "events.jsonl.1").exists():
            audit.rename(tmp_path / "events.jsonl.1")
    for path in (tmp_path / "events.jsonl.1", audit):
        result = verify(keygate_bin, path, "--strict")
        assert result.returncode == 0, result.stdout + result.stderr


def test_long_path_is_marked_truncated_and_query_records_names_not_values(keygate, fake_upstream):
    kg = start_proxy(keygate, fake_upstream)
    long_path = "/v1/" + "a" * 3000
    cursor = "cur_" + fake_secret("")
    with kg.client() as c:
        long = c.post(long_path, json=CHAT_BODY, headers=AUTH)
        paged = c.post(f"/v1/chat/completions?limit=5&after={cursor}", json=CHAT_BODY, headers=AUTH)
    # A lab config refuses any query string, as the lab compares the whole target; the record
    # still names the parameters, never their values.
    assert paged.status_code == 403, paged.text

    cut = kg.audit_record(long.headers["x-request-id"])
    assert len(cut["path"]) == 2048 and long_path.startswith(cut["path"])
    assert cut["path_truncated"] is True
    assert cut["target_sha256"] == hashlib.sha256(long_path.encode()).hexdigest()

    record = kg.audit_record(paged.headers["x-request-id"])
    assert record["query_params"] == ["limit", "after"]
    assert record["path"] == "/v1/chat/completions" and "path_truncated" not in record
    assert cursor not in kg.audit_path.read_text()


def test_tokens_are_recorded_for_an_agent_without_a_budget(keygate, fake_upstream):
    kg = start_proxy(keygate, fake_upstream)
    with kg.client() as c:
        r = c.post("/v1/chat/completions", json=CHAT_BODY, headers=AUTH)
    assert r.status_code == 200
    assert r.json()["usage"]["total_tokens"] == 14
    assert kg.audit_record(r.headers["x-request-id"])["tokens"] == 14


def test_sigterm_after_many_requests_loses_no_record_of_an_answered_request(keygate, keygate_bin, fake_upstream):
    kg = start_proxy(keygate, fake_upstream)
    answered: list[str] = []
    lock = threading.Lock()
    stop_sent = threading.Event()

    with httpx.Client(base_url=kg.url, timeout=DEADLINE, trust_env=False, limits=httpx.Limits(max_connections=16)) as c:

        def one(i: int) -> None:
            try:
                r = c.post("/v1/chat/completions", json=dict(CHAT_BODY, user=f"req-{i}"), headers=AUTH)
            except httpx.HTTPError:
                return  # refused after the listener closed: never answered, nothing to record
            with lock:
                answered.append(r.headers["x-request-id"])
                if len(answered) == 150 and not stop_sent.is_set():
                    stop_sent.set()
                    os.kill(kg.proc.pid, signal.SIGTERM)

        with ThreadPoolExecutor(max_workers=16) as pool:
            list(pool.map(one, range(400)))

    assert stop_sent.is_set()
    assert kg.stop() == 0
    log = kg.audit_log()
    ids = [r["request_id"] for r in log if "request_id" in r]
    assert len(ids) == len(set(ids)), "a request has two records"
    missing = set(answered) - set(ids)
    assert not missing, f"{len(missing)} answered requests have no audit record"
    assert log[-1]["event"] == "stop"
    result = verify(keygate_bin, kg.audit_path, "--strict")
    assert result.returncode == 0, result.stdout + result.stderr


def test_held_secret_in_the_url_is_refused_and_kept_out_of_the_audit_log(keygate, fake_upstream):
    """An exfiltration attempt through the URL is refused and recorded, but its record carries
    neither the path's nor the query's copy of the key."""
    kg = start_proxy(keygate, fake_upstream)
    with kg.client() as c:
        ordinary = c.post("/v1/chat/completions", json=CHAT_BODY, headers=AUTH)
        in_path = c.post(f"/v1/chat/completions/{KEY}", json=CHAT_BODY, headers=AUTH)
        as_name = c.post(f"/v1/chat/completions?{KEY}", json=CHAT_BODY, headers=AUTH)
        as_value = c.post(f"/v1/chat/completions?key={KEY}", json=CHAT_BODY, headers=AUTH)
    assert ordinary.status_code == 200
    for r in (in_path, as_name, as_value):
        assert r.status_code in (403, 404), r.text
        assert kg.audit_record(r.headers["x-request-id"])["decision"] == "deny"
    assert KEY not in kg.audit_path.read_text()
    assert kg.audit_record(in_path.headers["x-request-id"])["path"].startswith("/v1/chat/completions/[REDACTED")
    assert kg.audit_record(as_value.headers["x-request-id"])["query_params"] == ["key"]


def two_signed_runs(keygate, keygate_bin, fake_upstream, tmp_path):
    """Two keygate runs, two answered requests each, on one signed log: returns the log's lines,
    the log, the head file, the public key and the config."""
    token = new_token()
    state = tmp_path / "state"
    config = f'state_dir = "{state}"\n' + native_config(fake_upstream.url, agent_routes=("openai",))
    env = {"KEYGATE_AGENT_TOKEN": token, "OPENAI_API_KEY": fake_secret("sk-proj-head"), "ANTHROPIC_API_KEY": fake_secret("sk-ant-head")}
    audit = tmp_path / "signed.jsonl"
    for run in range(2):
        kg = keygate(config, env=env, audit_log=audit)
        with kg.client() as c:
            for i in range(2):
                body = dict(CHAT_BODY, user=f"run{run}-{i}")
                r = c.post("/openai/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {token}"})
                assert r.status_code == 200, r.text
        assert kg.stop() == 0
    printed = run_keygate(keygate_bin, ["audit", "key", "--config", str(kg.config_path)], tmp_path)
    assert printed.returncode == 0, printed.stderr
    return audit.read_text().splitlines(), audit, state / "audit.head", printed.stdout.strip(), kg.config_path


def test_log_cut_at_a_run_boundary_verifies_alone_but_fails_against_the_head_file(
    keygate, keygate_bin, fake_upstream, tmp_path
):
    lines, audit, head, public, config = two_signed_runs(keygate, keygate_bin, fake_upstream, tmp_path)
    assert stat.S_IMODE(head.stat().st_mode) == 0o600
    assert [p.name for p in head.parent.iterdir() if p.name.endswith(".tmp")] == []
    events = [json.loads(line).get("event") for line in lines]
    end_of_run_1 = events.index("stop") + 1
    assert end_of_run_1 < len(lines) and events[-1] == "stop"

    # The benign neighbour: the whole log reaches the record the head names.
    whole = verify(keygate_bin, audit, "--strict", "--key", public, "--head", head)
    assert whole.returncode == 0, whole.stdout + whole.stderr
    assert f":{len(lines)}: reaches the end anchor" in whole.stdout, whole.stdout

    cut = tmp_path / "cut.jsonl"
    cut.write_text("\n".join(lines[:end_of_run_1]) + "\n")
    # Everything left is intact and signed: alone, the cut cannot be seen...
    alone = verify(keygate_bin, cut, "--strict", "--key", public)
    assert alone.returncode == 0 and "closed by a stop record" in alone.stdout, alone.stdout
    # ...against the head file it can, naming what is missing.
    caught = verify(keygate_bin, cut, "--strict", "--key", public, "--head", head)
    assert caught.returncode == 1, caught.stdout + caught.stderr
    assert f"lines {end_of_run_1 + 1}..{len(lines)} are missing" in caught.stdout, caught.stdout
    as_json = verify(keygate_bin, cut, "--key", public, "--head", head, "--json")
    assert as_json.returncode == 1 and json.loads(as_json.stdout)["line"] == end_of_run_1 + 1, as_json.stdout
    # --config finds the head file in the config's state_dir.
    via_config = verify(keygate_bin, cut, "--key", public, "--config", config)
    assert via_config.returncode == 1 and "are missing" in via_config.stdout, via_config.stdout
    assert "head file was written for" in via_config.stdout, via_config.stdout
    assert verify(keygate_bin, audit, "--key", public, "--config", config).returncode == 0
    by_hash = verify(keygate_bin, cut, "--to-hash", json.loads(lines[-1])["hash"])
    assert by_hash.returncode == 1, by_hash.stdout

    # A head pointed back at the cut's end, without the key, does not hold.
    moved = json.loads(head.read_text())
    moved.update(hash=json.loads(lines[end_of_run_1 - 1])["hash"], line=end_of_run_1)
    forged_head = tmp_path / "forged.head"
    forged_head.write_text(json.dumps(moved))
    forged = verify(keygate_bin, cut, "--key", public, "--head", forged_head)
    assert forged.returncode == 1 and "does not hold" in forged.stdout, forged.stdout
    # The head is checked with the key, so it needs one.
    assert verify(keygate_bin, cut, "--head", head).returncode == 2


def test_well_formed_record_with_a_wrong_hash_before_a_start_record_is_broken_not_a_crash_cut(
    keygate, keygate_bin, fake_upstream, tmp_path
):
    lines, audit, head, public, config = two_signed_runs(keygate, keygate_bin, fake_upstream, tmp_path)
    second_start = [n for n, line in enumerate(lines) if json.loads(line).get("event") == "start"][1]
    forged_record = dict(json.loads(lines[1]), request_id="forged", status=200, hash="11" * 32)
    forged = tmp_path / "forged.jsonl"
    forged.write_text("\n".join(lines[:second_start] + [json.dumps(forged_record, separators=(",", ":"))] + lines[second_start:]) + "\n")
    result = verify(keygate_bin, forged, "--key", public)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f":{second_start + 1}: hash does not match" in result.stdout, result.stdout
    assert "cut mid-write" not in result.stdout

    # The benign neighbour: a line really cut mid-write there is still reported, not broken.
    torn = tmp_path / "torn.jsonl"
    torn.write_text("\n".join(lines[:second_start] + [lines[1][:45]] + lines[second_start:]) + "\n")
    # The next run's start record chains to the line before the torn one.
    restarted = verify(keygate_bin, torn, "--key", public)
    assert restarted.returncode == 0 and f":{second_start + 1}: cut mid-write by a crash" in restarted.stdout, (
        restarted.stdout
    )
