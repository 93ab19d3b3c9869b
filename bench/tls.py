"""`bench/run --only tls`: what keygate's forward proxy (TLS termination) costs, against nginx doing
the same TLS proxying.

Three targets, the same HTTPS upstream (bench/tools fake-upstream with --tls: rustls, a leaf
certificate for api.bench.test from a test CA made here with openssl at run time), the same client
(bench/tools tls-client: one thread, N connections, HTTP/1.1 keep-alive POSTs of ~120 bytes):
  - direct:  client -TLS-> upstream (the provider key sent by the client);
  - keygate: client -CONNECT api.bench.test:443-> keygate's proxy_listen, TLS inside the tunnel
             terminated by keygate with a leaf from its own CA; each request authorized (rate and
             budget policy), the key attached, the answer redacted, one audit record; then TLS to
             the upstream checked against `upstream_ca`;
  - nginx:   client -TLS-> nginx (a leaf from the test CA) -TLS-> upstream, `proxy_ssl_verify on`,
             keepalive pool, the Authorization header set. nginx cannot terminate a CONNECT tunnel,
             so its client speaks TLS to it directly: the CONNECT exchange (once per connection) is
             the only step keygate does that nginx does not.
Pinned: client on CPU 0, proxy and upstream on CPU 1. Rounds interleaved (round r runs every
target at every point), median per point. A point with any transport error or non-2xx answer
fails the run: it measured nothing.
"""
import json
import os
import shutil
import statistics
import subprocess
import time

HOST = "api.bench.test"
POINTS = [1, 32]
TARGETS = ["direct", "nginx", "keygate"]


def sh(argv):
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def make_certs(d):
    """A test CA and one leaf for HOST (ECDSA P-256), made now: nothing key-like is committed."""
    ca_key, ca, key, csr, crt = (os.path.join(d, n) for n in
                                 ("tls-ca.key", "tls-ca.pem", "tls-leaf.key", "tls-leaf.csr", "tls-leaf.pem"))
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    sh(["openssl", "req", "-x509", *ec, "-keyout", ca_key, "-out", ca, "-days", "2", "-subj", "/CN=keygate bench test CA",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"])
    sh(["openssl", "req", *ec, "-keyout", key, "-out", csr, "-subj", f"/CN={HOST}"])
    ext = os.path.join(d, "tls-leaf.ext")
    with open(ext, "w") as f:
        f.write(f"subjectAltName=DNS:{HOST}\nbasicConstraints=critical,CA:FALSE\n"
                "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n")
    sh(["openssl", "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", crt,
        "-days", "2", "-extfile", ext])
    return ca, crt, key


KEYGATE_TOML = """\
# keygate's forward proxy as benchmarked: a host route to the TLS fake upstream, bearer injection,
# audit on (hash-chained), response redaction (always on), rate + budget policy never reached.
listen = ["127.0.0.1:0"]
proxy_listen = ["127.0.0.1:0"]
audit_log = "{tmp}/keygate-tls-audit.jsonl"
state_dir = "{tmp}/keygate-tls-state"

[secrets.bench]
source = "env"
name = "KEYGATE_BENCH_PROVIDER_KEY"

[routes.bench]
host = "{host}"
upstream = "https://127.0.0.1:{port}"
upstream_ca = "{ca}"
secret = "bench"
inject = "bearer"
allow = ["POST /v1/chat/completions"]

[agents.bench]
token_env = "KEYGATE_BENCH_TOKEN"
routes = ["bench"]
rate = "4000000000/h"
budget_tokens = {{ per = "day", limit = 1000000000000000 }}
"""

NGINX_CONF = """\
# nginx doing the same TLS proxying: TLS in (a leaf from the bench test CA), TLS out with the
# upstream's certificate verified, keepalive both sides, the Authorization header set. One worker.
worker_processes 1;
daemon off;
master_process on;
pid {tmp}/nginx-tls.pid;
error_log {tmp}/nginx-tls-error.log warn;
worker_rlimit_nofile 8192;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/nginx-body;
    proxy_temp_path {tmp}/nginx-proxy;
    fastcgi_temp_path {tmp}/nginx-fastcgi;
    uwsgi_temp_path {tmp}/nginx-uwsgi;
    scgi_temp_path {tmp}/nginx-scgi;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    tcp_nodelay on;
    upstream fake_tls {{
        server 127.0.0.1:{up_port};
        keepalive 512;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port} ssl backlog=4096;
        server_name {host};
        ssl_certificate {crt};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.3;
        location / {{
            proxy_pass https://fake_tls;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host {host};
            proxy_set_header Authorization "Bearer {provider_key}";
            proxy_ssl_verify on;
            proxy_ssl_trusted_certificate {ca};
            proxy_ssl_name {host};
            proxy_ssl_server_name on;
            proxy_ssl_session_reuse on;
            proxy_ssl_protocols TLSv1.3;
            proxy_buffering off;
            proxy_request_buffering off;
        }}
    }}
}}
"""


def run_client(h, target, conns, seconds):
    t = target
    argv = [os.path.join(h.TOOLS, "tls-client"), "--addr", t["addr"], "--host", HOST, "--ca", t["ca"],
            "--conns", str(conns), "--seconds", str(seconds)]
    if t.get("connect"):
        argv.append("--connect")
    argv = ["taskset", "-c", h.CLIENT_CPU] + argv
    env = dict(os.environ, BENCH_HEADERS=t["headers"], BENCH_PROXY_AUTH=t.get("proxy_auth", ""))
    r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=seconds + 30)
    for line in r.stdout.splitlines():
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"tls-client gave no result: {r.stdout[-300:]} {r.stderr[-500:]}")


def start_servers(h, secrets, certs):
    ca, crt, key = certs
    tmp = h.RUN_DIR
    cpu = h.SERVER_CPU
    targets = {}
    up_port = h.free_port()
    p = h.spawn("upstream-tls", [os.path.join(h.TOOLS, "fake-upstream"), "--port", str(up_port),
                                 "--expect-auth", "Bearer " + secrets["provider_key"],
                                 "--tls-cert", crt, "--tls-key", key], cpus=cpu)
    line = h.read_line(p, 10)
    if not line or not json.loads(line)["listen"].startswith("https://"):
        raise RuntimeError(f"TLS fake upstream did not start: {line!r}")
    targets["direct"] = {"addr": f"127.0.0.1:{up_port}", "ca": ca,
                         "headers": "Authorization: Bearer " + secrets["provider_key"], "procs": [p]}

    port = h.free_port()
    for d in ["nginx-body", "nginx-proxy", "nginx-fastcgi", "nginx-uwsgi", "nginx-scgi"]:
        os.makedirs(os.path.join(tmp, d), exist_ok=True)
    conf = os.path.join(tmp, "nginx-tls.conf")
    with open(conf, "w") as f:
        f.write(NGINX_CONF.format(tmp=tmp, up_port=up_port, port=port, host=HOST, crt=crt, key=key, ca=ca,
                                  provider_key=secrets["provider_key"]))
    p = h.spawn("nginx-tls", [shutil.which("nginx") or "/usr/sbin/nginx", "-c", conf, "-p", tmp], cpus=cpu,
                stdout=subprocess.DEVNULL)
    if not h.wait_port(port, 10, p):
        raise RuntimeError("nginx did not start; see " + os.path.join(tmp, "nginx-tls-error.log"))
    # nginx does not check the agent's token (it has no notion of one); it only sets the key
    targets["nginx"] = {"addr": f"127.0.0.1:{port}", "ca": ca,
                        "headers": "Authorization: Bearer " + secrets["agent_token"], "procs": [p]}

    cfg = os.path.join(tmp, "keygate-tls.toml")
    with open(cfg, "w") as f:
        f.write(KEYGATE_TOML.format(tmp=tmp, host=HOST, port=up_port, ca=ca))
    os.makedirs(os.path.join(tmp, "keygate-tls-state"), mode=0o700, exist_ok=True)
    env = dict(os.environ, KEYGATE_BENCH_TOKEN=secrets["agent_token"],
               KEYGATE_BENCH_PROVIDER_KEY=secrets["provider_key"], RUST_LOG="warn")
    p = h.spawn("keygate-tls", [h.KEYGATE_BIN, "serve", "--config", cfg], cpus=cpu, env=env)
    line = h.read_line(p, 15)
    info = json.loads(line) if line and line.startswith("{") else {}
    if not info.get("ok") or not info.get("proxy_listeners"):
        err = open(os.path.join(tmp, "keygate-tls.stderr"), errors="replace").read()[-600:]
        raise RuntimeError(f"keygate (forward proxy) did not start: {line!r} {err}")
    out = subprocess.run([h.KEYGATE_BIN, "ca", "export", "--config", cfg], env=env, capture_output=True,
                         text=True, timeout=30)
    if out.returncode != 0 or not out.stdout.startswith("-----BEGIN CERTIFICATE-----"):
        raise RuntimeError(f"keygate ca export failed: {out.stderr[-300:]}")
    kg_ca = os.path.join(tmp, "keygate-proxy-ca.pem")
    with open(kg_ca, "w") as f:
        f.write(out.stdout)
    targets["keygate"] = {"addr": info["proxy_listeners"][0].split("://")[-1], "ca": kg_ca, "connect": True,
                          "proxy_auth": "Bearer " + secrets["agent_token"], "headers": "", "procs": [p],
                          "audit": os.path.join(tmp, "keygate-tls-audit.jsonl")}
    return targets


def audit_counts(path):
    n = {"CONNECT": 0, "request": 0, "deny": 0}
    with open(path) as f:
        for line in f:
            try:
                r = json.loads(line)
            except ValueError:
                continue
            n["CONNECT" if r.get("method") == "CONNECT" else "request"] += 1
            n["deny"] += r.get("decision") == "deny"
    return n


def run(h, args, secrets, dur, rounds):
    res = {"scenario": "tls", "machine": h.machine_info(), "load_before": h.loadavg(), "settings": {
        "seconds_per_point": dur, "rounds": rounds, "points": POINTS,
        "client": "bench/tools tls-client: one thread, N connections, HTTP/1.1 keep-alive POST ~120-byte JSON, "
                  "rustls (ring), TLS 1.3, ALPN http/1.1",
        "upstream": "bench/tools fake-upstream --tls (rustls, ring), ~650-byte JSON answer",
        "pinning": f"client on CPU {h.CLIENT_CPU}; proxy under test and upstream on CPU {h.SERVER_CPU}",
    }, "runs": [], "points": [], "load": []}
    certs = make_certs(h.RUN_DIR)
    targets = start_servers(h, secrets, certs)
    res["versions"] = {"nginx": subprocess.run([shutil.which("nginx") or "/usr/sbin/nginx", "-v"],
                                               capture_output=True, text=True).stderr.strip()}
    h.log("TLS bench servers up; warming up")
    for name in TARGETS:
        r = run_client(h, targets[name], 4, 1)
        check(name, 4, r)
    for rnd in range(rounds):
        res["load"].append(h.loadavg())
        for conns in POINTS:
            for name in TARGETS:
                r = run_client(h, targets[name], conns, dur)
                check(name, conns, r)
                r.update(target=name, round=rnd)
                res["runs"].append(r)
                h.log(f"round {rnd + 1}/{rounds} {name:8} c={conns:<3} {r['rps']:>9,.0f} req/s  "
                      f"p50 {r['p50_us']:,.0f} µs  p99 {r['p99_us']:,.0f} µs")
    res["load_after"] = h.loadavg()
    for conns in POINTS:
        pt = {"conns": conns}
        for name in TARGETS:
            runs = [r for r in res["runs"] if r["target"] == name and r["conns"] == conns]
            pt[name] = {"rps": statistics.median(r["rps"] for r in runs),
                        "p50_us": statistics.median(r["p50_us"] for r in runs),
                        "p99_us": statistics.median(r["p99_us"] for r in runs),
                        "rps_rounds": [round(r["rps"]) for r in runs]}
        pt["keygate_over_nginx"] = pt["keygate"]["rps"] / pt["nginx"]["rps"]
        pt["keygate_over_direct"] = pt["keygate"]["rps"] / pt["direct"]["rps"]
        pt["nginx_over_direct"] = pt["nginx"]["rps"] / pt["direct"]["rps"]
        pt["keygate_added_p50_us"] = pt["keygate"]["p50_us"] - pt["direct"]["p50_us"]
        pt["nginx_added_p50_us"] = pt["nginx"]["p50_us"] - pt["direct"]["p50_us"]
        res["points"].append(pt)
    res["keygate_audit"] = audit_counts(targets["keygate"]["audit"])
    sent = sum(r["requests"] for r in res["runs"] if r["target"] == "keygate")
    res["keygate_requests_measured"] = sent
    if res["keygate_audit"]["request"] < sent or res["keygate_audit"]["deny"]:
        raise RuntimeError(f"keygate audit does not account for the requests: {res['keygate_audit']} vs {sent}")
    for name in ["keygate-tls", "nginx-tls", "upstream-tls"]:
        h.stop_named(name)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "tls.json"), "w") as f:
        json.dump(res, f, indent=1)
    md = render(res)
    with open(os.path.join(args.out, "tls.md"), "w") as f:
        f.write(md)
    print(md)
    h.log(f"wrote {args.out}/tls.md and .json")


def check(name, conns, r):
    if r["errors"] or r["non2xx"] or not r["requests"]:
        raise RuntimeError(f"{name} at {conns} conns: {r['errors']} errors, {r['non2xx']} non-2xx, "
                           f"{r['requests']} requests; first: {r.get('first_failure')}")


def render(res):
    def us(x):
        return f"{x:,.0f} µs"

    s = res["settings"]
    m = res["machine"]
    out = ["### Forward proxy: TLS termination, keygate vs nginx", "",
           f"{m.get('date', '?')}, keygate {m.get('keygate_commit', '?')}, {m.get('nginx', '?')}; "
           f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores; {s['pinning']}; {s['seconds_per_point']} s per "
           f"point, median of {s['rounds']} interleaved rounds; load average before "
           f"{res['load_before'][0]:.1f}, after {res['load_after'][0]:.1f} (shared machine).", "",
           "| conns | direct req/s | nginx req/s | keygate req/s | keygate / nginx | keygate / direct "
           "| p50 direct | p50 nginx (added) | p50 keygate (added) | p99 nginx | p99 keygate |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in res["points"]:
        d, n, k = p["direct"], p["nginx"], p["keygate"]
        out.append(f"| {p['conns']} | {d['rps']:,.0f} | {n['rps']:,.0f} | {k['rps']:,.0f} | "
                   f"{p['keygate_over_nginx']:.2f}× | {p['keygate_over_direct']:.2f}× | {us(d['p50_us'])} | "
                   f"{us(n['p50_us'])} (+{p['nginx_added_p50_us']:,.0f}) | {us(k['p50_us'])} "
                   f"(+{p['keygate_added_p50_us']:,.0f}) | {us(n['p99_us'])} | {us(k['p99_us'])} |")
    out += ["", "Per-round req/s (direct / nginx / keygate): " + "; ".join(
        f"{p['conns']} conn(s): {p['direct']['rps_rounds']} / {p['nginx']['rps_rounds']} / {p['keygate']['rps_rounds']}"
        for p in res["points"]),
        "", f"keygate audit: {res['keygate_audit']['request']} request records and "
            f"{res['keygate_audit']['CONNECT']} CONNECT records for {res['keygate_requests_measured']} measured "
            "requests (plus warm-up and requests cut off at each run's end), no refusals.", ""]
    return "\n".join(out)
