#!/usr/bin/env python3
"""Faults and overload against a real inferd, each ending in PASS or FAIL.

Usage: python3 benches/faults.py [overload|disconnects|kill9|all] [--bin PATH] [--quick]

Starts `inferd serve` itself (default ./target/release/inferd, the default
model, a fresh ledger in a temporary folder, a free port on 127.0.0.1), so it
knows the process to measure and to kill:

  overload     measures the sustainable request rate (closed loop, 8 clients,
               20 s), then offers 3x that rate as a Poisson stream for 60 s of
               streamed requests. FAIL if any error other than 429/503 with
               Retry-After, if an admitted stream does not end with [DONE], or
               if resident memory grows by more than 25 % from before the
               overload to after it. Reports p50/p99 time to first token of the
               admitted requests.
  disconnects  1,000 streamed requests cut by their clients at random points
               (before the response, after 0-40 events), 64 at a time. FAIL
               unless KV blocks in use, running requests, open requests and
               open choices return to 0, the runtime's live tasks return to
               their baseline, and every request whose response began has
               exactly one ledger row.
  kill9        8 clients under load, kill -9 after 20 s. FAIL unless every
               completed request (full 200 body received) has its ledger row.

Standard library only. Prints one JSON object per scenario, then PASS/FAIL.
"""
import http.client
import json
import os
import random
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def percentile(xs, p):
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


class Server:
    def __init__(self, binary, extra=()):
        self.dir = tempfile.mkdtemp(prefix="inferd-faults-")
        self.ledger = os.path.join(self.dir, "usage.db")
        cmd = [binary, "serve", "--port", "0", "--ledger", self.ledger, *extra]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=open(os.path.join(self.dir, "server.log"), "w"),
                                     text=True)
        for line in self.proc.stdout:
            if line.startswith("inferd listening on "):
                url = line.split()[3]
                self.host, port = url.removeprefix("http://").split(":")
                self.port = int(port)
                break
        else:
            raise SystemExit(f"inferd did not start; see {self.dir}/server.log")
        threading.Thread(target=lambda: [None for _ in self.proc.stdout], daemon=True).start()

    def conn(self, timeout=600):
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def get(self, path):
        c = self.conn(30)
        c.request("GET", path)
        r = c.getresponse()
        body = r.read()
        c.close()
        return json.loads(body) if path != "/metrics" else body.decode()

    def rss_mib(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def ledger_rows(self, prefix):
        db = sqlite3.connect(f"file:{self.ledger}?mode=ro", uri=True)
        rows = db.execute("SELECT request_id FROM usage WHERE request_id LIKE ?", (prefix + "%",)).fetchall()
        db.close()
        return [r[0] for r in rows]


def completion(srv, rid, prompt, max_tokens, stream):
    """One request; returns (status, retry_after, ttft or None, done)."""
    t0 = time.perf_counter()
    c = srv.conn()
    body = {"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "stream": stream}
    c.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json", "X-Request-Id": rid})
    r = c.getresponse()
    if r.status != 200:
        r.read()
        c.close()
        return r.status, r.getheader("retry-after"), None, False
    ttft, done = None, False
    if stream:
        for raw in r:
            line = raw.decode().strip()
            if line.startswith("data: ") and ttft is None:
                ttft = time.perf_counter() - t0
            if line == "data: [DONE]":
                done = True
    else:
        done = bool(json.loads(r.read()).get("choices"))
        ttft = time.perf_counter() - t0
    c.close()
    return 200, None, ttft, done


def overload(binary, quick):
    srv = Server(binary)
    try:
        prompt = "Tell me a long story about a lighthouse keeper and the sea"
        calib_secs = 8 if quick else 20
        stop = time.perf_counter() + calib_secs
        count = [0]
        lock = threading.Lock()

        def closed():
            i = 0
            while time.perf_counter() < stop:
                i += 1
                if completion(srv, f"cal-{threading.get_ident()}-{i}", prompt, 32, False)[0] == 200:
                    with lock:
                        count[0] += 1
        ts = [threading.Thread(target=closed) for _ in range(8)]
        [t.start() for t in ts]
        [t.join() for t in ts]
        rate = count[0] / calib_secs
        offered = 3 * rate
        duration = 20 if quick else 60
        rss_before = srv.rss_mib()
        results, rss = [], [rss_before]
        threads = []
        t_end = time.perf_counter() + duration
        n = 0
        while time.perf_counter() < t_end:
            time.sleep(random.expovariate(offered))
            n += 1
            t = threading.Thread(target=lambda i=n: results.append(completion(srv, f"ovl-{i}", prompt, 32, True)))
            t.start()
            threads.append(t)
            if n % 20 == 0:
                rss.append(srv.rss_mib())
        for t in threads:
            t.join()
        time.sleep(2)
        rss_after = srv.rss_mib()
        by_status = {}
        for s, _, _, _ in results:
            by_status[s] = by_status.get(s, 0) + 1
        bad_status = [s for s, _, _, _ in results if s not in (200, 429, 503)]
        missing_retry = [s for s, ra, _, _ in results if s in (429, 503) and not ra]
        unfinished = [1 for s, _, _, d in results if s == 200 and not d]
        ttfts = [t for s, _, t, _ in results if s == 200 and t is not None]
        report = {
            "scenario": "overload", "sustainable_req_per_s": round(rate, 2), "offered_req_per_s": round(offered, 2),
            "seconds": duration, "requests": len(results), "by_status": by_status,
            "ttft_p50_s": percentile(ttfts, 50), "ttft_p99_s": percentile(ttfts, 99),
            "rss_mib_before": round(rss_before, 1), "rss_mib_max": round(max(rss), 1), "rss_mib_after": round(rss_after, 1),
        }
        failures = []
        if bad_status:
            failures.append(f"statuses other than 200/429/503: {sorted(set(bad_status))}")
        if missing_retry:
            failures.append(f"{len(missing_retry)} refusals without Retry-After")
        if unfinished:
            failures.append(f"{len(unfinished)} admitted streams did not end with [DONE]")
        if rss_after > 1.25 * rss_before:
            failures.append(f"RSS grew from {rss_before:.0f} to {rss_after:.0f} MiB")
        if by_status.get(200, 0) == 0 or sum(v for k, v in by_status.items() if k != 200) == 0:
            failures.append("the run did not both serve and shed: not an overload")
        return report, failures
    finally:
        srv.stop()


def cut_stream(srv, rid, events_before_cut):
    """Starts a stream and cuts it; True if its response had begun."""
    s = socket.create_connection((srv.host, srv.port), timeout=120)
    body = json.dumps({"prompt": f"Request {rid} tells a story", "max_tokens": 64, "ignore_eos": True, "stream": True})
    s.sendall((f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nX-Request-Id: {rid}\r\n"
               f"Content-Length: {len(body)}\r\n\r\n{body}").encode())
    began = False
    if events_before_cut >= 0:
        seen, buf = 0, b""
        while seen <= events_before_cut:
            chunk = s.recv(4096)
            if not chunk:
                break
            buf += chunk
            began = began or buf.startswith(b"HTTP/1.1 200")
            seen = buf.count(b"data: ")
    # Reset, not a graceful close: the way a crashed client or a proxy cuts.
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    s.close()
    return began


def wait_idle(srv, baseline_tasks, limit=60):
    deadline = time.time() + limit
    while True:
        st = srv.get("/stats")
        settled = (st["kv_blocks_used"] == 0 and st["num_requests_running"] == 0 and st["num_requests_waiting"] == 0
                   and st["open_requests"] == 0 and st["open_choices"] == 0
                   and st["runtime_alive_tasks"] <= baseline_tasks)
        if settled or time.time() > deadline:
            return st, settled
        time.sleep(0.5)


def disconnects(binary, quick):
    srv = Server(binary)
    try:
        total = 200 if quick else 1000
        time.sleep(1)
        baseline = srv.get("/stats")["runtime_alive_tasks"]
        began = {}
        lock = threading.Lock()
        sem = threading.Semaphore(64)
        rng = random.Random(20261130)
        plan = [rng.choice([-1, 0, 0, 1, 2, 5, 10, 20, 40]) for _ in range(total)]

        def one(i):
            with sem:
                try:
                    b = cut_stream(srv, f"cut-{i:04d}", plan[i])
                except OSError:
                    b = False
                with lock:
                    began[f"cut-{i:04d}"] = b
        t0 = time.perf_counter()
        ts = [threading.Thread(target=one, args=(i,)) for i in range(total)]
        [t.start() for t in ts]
        [t.join() for t in ts]
        secs = time.perf_counter() - t0
        st, settled = wait_idle(srv, baseline)
        time.sleep(1)  # the ledger's group commit
        rows = srv.ledger_rows("cut-")
        started = {rid for rid, b in began.items() if b}
        missing = sorted(started - set(rows))
        dupes = len(rows) - len(set(rows))
        report = {
            "scenario": "disconnects", "streams": total, "seconds": round(secs, 1), "responses_begun": len(started),
            "ledger_rows": len(rows), "missing_rows": len(missing), "duplicate_rows": dupes,
            "after": {k: st[k] for k in ("kv_blocks_used", "num_requests_running", "open_requests", "open_choices",
                                         "runtime_alive_tasks")},
            "baseline_alive_tasks": baseline,
        }
        failures = []
        if not settled:
            failures.append(f"did not return to idle within 60 s: {report['after']}")
        if missing:
            failures.append(f"{len(missing)} begun responses without a ledger row, e.g. {missing[:3]}")
        if dupes:
            failures.append(f"{dupes} duplicate ledger rows")
        return report, failures
    finally:
        srv.stop()


def kill9(binary, quick):
    srv = Server(binary)
    completed, lock = [], threading.Lock()
    stop = threading.Event()

    def client(c):
        i = 0
        while not stop.is_set():
            i += 1
            rid = f"k9-{c}-{i}"
            try:
                status, _, _, done = completion(srv, rid, "Count to twenty:", 16, False)
            except (OSError, http.client.HTTPException, ValueError):
                return
            if status == 200 and done:
                with lock:
                    completed.append(rid)
    ts = [threading.Thread(target=client, args=(c,)) for c in range(8)]
    [t.start() for t in ts]
    time.sleep(8 if quick else 20)
    srv.proc.kill()
    srv.proc.wait()
    stop.set()
    [t.join() for t in ts]
    rows = set(srv.ledger_rows("k9-"))
    missing = [r for r in completed if r not in rows]
    report = {"scenario": "kill9", "completed_before_kill": len(completed), "ledger_rows": len(rows), "missing_rows": len(missing)}
    failures = [f"{len(missing)} completed requests without a ledger row"] if missing else []
    if not completed:
        failures.append("nothing completed before the kill")
    return report, failures


def main():
    args = sys.argv[1:]
    quick = "--quick" in args
    binary = os.path.join(ROOT, "target/release/inferd")
    if "--bin" in args:
        binary = args[args.index("--bin") + 1]
    which = [a for a in args if a in ("overload", "disconnects", "kill9", "all")] or ["all"]
    scenarios = {"overload": overload, "disconnects": disconnects, "kill9": kill9}
    names = list(scenarios) if which == ["all"] else which
    failed = False
    for name in names:
        report, failures = scenarios[name](binary, quick)
        print(json.dumps(report))
        for f in failures:
            print(f"FAIL {name}: {f}")
        if not failures:
            print(f"PASS {name}")
        failed |= bool(failures)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
