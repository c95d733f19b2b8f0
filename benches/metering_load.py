#!/usr/bin/env python3
"""Load a running inferd's metering path and report the ledger's throughput.

Usage: python3 benches/metering_load.py [BASE_URL] [CLIENTS] [SECONDS] [MAX_TOKENS] [API_KEY]
CLIENTS threads send short completions back to back for SECONDS (defaults:
32 clients, 20 s, 1 token). Reports requests/s served, ledger records/s and
records per commit (from /metrics), commit time per record, and checks that
/v1/usage grew by exactly the tokens the clients were told they used.
Standard library only; loopback only.
"""
import http.client
import json
import re
import sys
import threading
import time
import urllib.parse

base = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8080"
clients = int(sys.argv[2]) if len(sys.argv) > 2 else 32
seconds = float(sys.argv[3]) if len(sys.argv) > 3 else 20.0
max_tokens = int(sys.argv[4]) if len(sys.argv) > 4 else 1
key = sys.argv[5] if len(sys.argv) > 5 else None
url = urllib.parse.urlparse(base)
headers = {"Content-Type": "application/json", "X-Inferd-Feature": "metering-load"}
if key:
    headers["Authorization"] = f"Bearer {key}"


def call(method, path, body=None):
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=120)
    conn.request(method, path, json.dumps(body) if body else None, headers)
    resp = conn.getresponse()
    return resp.status, resp.read()


def metric(text, name):
    m = re.search(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def ledger_counters():
    _, body = call("GET", "/metrics")
    text = body.decode()
    return (metric(text, "inferd_ledger_records_total"), metric(text, "inferd_ledger_commits_total"),
            metric(text, "inferd_ledger_busy_seconds"))


def usage_tokens():
    status, body = call("GET", "/v1/usage?group_by=feature")
    assert status == 200, body
    for row in json.loads(body)["data"]:
        if row["feature"] == "metering-load":
            return row["total_tokens"], row["requests"]
    return 0, 0


lock = threading.Lock()
told = {"tokens": 0, "requests": 0, "refused": 0}
deadline = time.time() + seconds


def worker(i):
    n = 0
    while time.time() < deadline:
        status, body = call("POST", "/v1/completions",
                            {"prompt": f"Client {i} request {n}:", "max_tokens": max_tokens, "temperature": 0})
        n += 1
        with lock:
            if status == 200:
                told["tokens"] += json.loads(body)["usage"]["total_tokens"]
                told["requests"] += 1
            else:
                told["refused"] += 1


tokens0, requests0 = usage_tokens()
r0, c0, b0 = ledger_counters()
t0 = time.time()
threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
for t in threads:
    t.start()
for t in threads:
    t.join()
wall = time.time() - t0
r1, c1, b1 = ledger_counters()
tokens1, requests1 = usage_tokens()
records, commits = r1 - r0, c1 - c0
print(f"{clients} clients, {wall:.1f} s: {told['requests']} served ({told['requests'] / wall:.1f}/s), {told['refused']} refused")
print(f"ledger: {records:.0f} records ({records / wall:.1f}/s) in {commits:.0f} commits "
      f"({records / max(commits, 1):.2f} records per commit), {1e6 * (b1 - b0) / max(records, 1):.0f} us of commit time per record")
ok = tokens1 - tokens0 == told["tokens"] and requests1 - requests0 == told["requests"]
print(f"/v1/usage: +{tokens1 - tokens0} tokens in +{requests1 - requests0} requests; clients were told "
      f"{told['tokens']} in {told['requests']}: {'equal' if ok else 'DIFFERENT'}")
sys.exit(0 if ok else 1)
