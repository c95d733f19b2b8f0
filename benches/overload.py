#!/usr/bin/env python3
"""Overload a running inferd and report how it sheds load.

Usage: python3 benches/overload.py [BASE_URL] [CLIENTS] [MAX_TOKENS]
Fires CLIENTS concurrent completions (default 64, 64 tokens each, ignore_eos)
and reports served/shed counts by status and error code, Retry-After values,
latency percentiles per outcome, and the largest waiting queue /stats showed
while it ran. Standard library only; loopback only.
"""
import collections
import http.client
import json
import sys
import threading
import time
import urllib.parse

base = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8080"
clients = int(sys.argv[2]) if len(sys.argv) > 2 else 64
max_tokens = int(sys.argv[3]) if len(sys.argv) > 3 else 64
url = urllib.parse.urlparse(base)


def call(method, path, body=None):
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=600)
    conn.request(method, path, json.dumps(body) if body else None, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = resp.read()
    return resp.status, resp.getheader("retry-after"), json.loads(data or b"null")


results = []
lock = threading.Lock()
done = threading.Event()
max_waiting = 0


def client(i):
    t0 = time.perf_counter()
    status, retry, body = call("POST", "/v1/completions",
                               {"prompt": f"Client {i} asks for a story", "max_tokens": max_tokens, "ignore_eos": True})
    code = body["error"]["code"] if status != 200 else "ok"
    with lock:
        results.append((status, code, retry, time.perf_counter() - t0))


def watch():
    global max_waiting
    while not done.is_set():
        _, _, stats = call("GET", "/stats")
        max_waiting = max(max_waiting, stats["num_requests_waiting"])
        time.sleep(0.02)


watcher = threading.Thread(target=watch)
watcher.start()
start = time.perf_counter()
threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
for t in threads:
    t.start()
for t in threads:
    t.join()
wall = time.perf_counter() - start
done.set()
watcher.join()

by = collections.defaultdict(list)
retries = collections.Counter()
for status, code, retry, took in results:
    by[(status, code)].append(took)
    if retry:
        retries[retry] += 1
print(f"{clients} clients x {max_tokens} tokens in {wall:.2f} s; largest waiting queue seen: {max_waiting}")
for (status, code), times in sorted(by.items()):
    times.sort()
    p50 = times[len(times) // 2]
    print(f"  {status} {code}: {len(times)}  latency p50 {p50:.2f} s, max {times[-1]:.2f} s")
print(f"  Retry-After values: {dict(retries)}")
_, _, stats = call("GET", "/stats")
print(f"  after: kv_blocks_used {stats['kv_blocks_used']}, running {stats['num_requests_running']}, waiting {stats['num_requests_waiting']}")
