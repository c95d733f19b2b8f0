#!/usr/bin/env python3
"""A rolling restart under load, with a real load balancer: `make test-cluster`.

Three inferd replicas, each in its own network namespace as its own host
(our "availability zones"), behind HAProxy configured as the ALB stack in
deploy/aws/inferd.yaml is: health check GET /ready every 5 s, 2 failures to
take a server out and 2 successes to put it back, round robin, no retries.
Clients send streaming and non-streaming completions without pause while
each replica in turn gets SIGTERM, drains, exits and restarts.

PASS when: no request failed at a client, every stream ended with [DONE],
every request is metered exactly once across the replicas' ledgers, and no
replica answered a request with 503 (it stopped getting traffic before its
drain delay ran out). Prints figures: requests, p50/p99 latency during the
roll, and how long each replica took from SIGTERM to exit and back to
serving. Needs root (ip netns) and haproxy (the Makefile installs it).

Usage: python3 tests/cluster/rolling.py [--bin target/release/inferd]
"""
import http.client
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ZONES = 3
PORT = 8080
LB_PORT = 18480
CHECK_INTER_S = 5      # the ALB target group's interval
DRAIN_DELAY_S = 12     # > 2 failed checks at 5 s plus a check's own time
DRAIN_TIMEOUT_S = 60


def sh(*cmd, check=True):
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


def ns(i):
    return f"inferd-az{i}"


def addr(i):
    return f"10.77.{i}.2"


def setup_network():
    for i in range(1, ZONES + 1):
        sh("ip", "netns", "del", ns(i), check=False)
        sh("ip", "link", "del", f"veth-az{i}", check=False)
        sh("ip", "netns", "add", ns(i))
        sh("ip", "link", "add", f"veth-az{i}", "type", "veth", "peer", "name", "eth0", "netns", ns(i))
        sh("ip", "addr", "add", f"10.77.{i}.1/24", "dev", f"veth-az{i}")
        sh("ip", "link", "set", f"veth-az{i}", "up")
        sh("ip", "netns", "exec", ns(i), "ip", "addr", "add", f"{addr(i)}/24", "dev", "eth0")
        sh("ip", "netns", "exec", ns(i), "ip", "link", "set", "eth0", "up")
        sh("ip", "netns", "exec", ns(i), "ip", "link", "set", "lo", "up")


def teardown_network():
    for i in range(1, ZONES + 1):
        sh("ip", "netns", "del", ns(i), check=False)
        sh("ip", "link", "del", f"veth-az{i}", check=False)


class Replica:
    def __init__(self, i, binary, work):
        self.i, self.binary, self.work = i, binary, work
        self.ledger = os.path.join(work, f"az{i}.db")
        self.proc = None

    def start(self):
        log = open(os.path.join(self.work, f"az{self.i}.log"), "a")
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns(self.i), self.binary, "serve", "--host", addr(self.i), "--port", str(PORT),
             "--ledger", self.ledger, "--threads", "1", "--kv-cache-memory", "256MiB",
             "--drain-delay", str(DRAIN_DELAY_S), "--drain-timeout", str(DRAIN_TIMEOUT_S)],
            cwd=ROOT, stdout=log, stderr=log)

    def ready(self):
        try:
            c = http.client.HTTPConnection(addr(self.i), PORT, timeout=2)
            c.request("GET", "/ready")
            ok = c.getresponse().status == 200
            c.close()
            return ok
        except OSError:
            return False


def haproxy_config(work):
    servers = "\n".join(
        f"    server az{i} {addr(i)}:{PORT} check inter {CHECK_INTER_S}s fall 2 rise 2" for i in range(1, ZONES + 1))
    return f"""global
    maxconn 4096
    stats socket {work}/haproxy.sock mode 600 level admin
defaults
    mode http
    timeout connect 5s
    timeout client 300s
    timeout server 300s
    timeout http-keep-alive 60s
    retries 0
frontend lb
    bind 127.0.0.1:{LB_PORT}
    default_backend inferd
backend inferd
    balance roundrobin
    option httpchk GET /ready
    http-check expect status 200
    timeout check 3s
{servers}
"""


def lb_states(work):
    """Server name -> 'UP'/'DOWN' from HAProxy's stats socket."""
    import socket
    s = socket.socket(socket.AF_UNIX)
    s.connect(f"{work}/haproxy.sock")
    s.sendall(b"show stat\n")
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    s.close()
    out = {}
    for line in data.decode().splitlines():
        f = line.split(",")
        if len(f) > 17 and f[0] == "inferd" and f[1].startswith("az"):
            out[f[1]] = f[17]
    return out


def wait(cond, limit, what):
    t0 = time.time()
    while not cond():
        if time.time() - t0 > limit:
            raise SystemExit(f"FAIL: {what} within {limit} s")
        time.sleep(0.2)
    return time.time() - t0


class Load:
    def __init__(self, clients=4):
        self.stop = threading.Event()
        self.results = []  # (rid, kind, status, complete, seconds)
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.client, args=(c,)) for c in range(clients)]

    def client(self, c):
        n = 0
        while not self.stop.is_set():
            n += 1
            stream = n % 2 == 0
            rid = f"roll-{c}-{n}"
            t0 = time.perf_counter()
            status, complete = 0, False
            try:
                conn = http.client.HTTPConnection("127.0.0.1", LB_PORT, timeout=300)
                body = {"prompt": f"Client {c} request {n}:", "max_tokens": 24, "ignore_eos": True, "stream": stream}
                conn.request("POST", "/v1/completions", json.dumps(body),
                             {"Content-Type": "application/json", "X-Request-Id": rid})
                r = conn.getresponse()
                status = r.status
                data = r.read().decode()
                complete = status == 200 and (("data: [DONE]" in data) if stream else bool(json.loads(data)["choices"]))
                conn.close()
            except Exception as e:  # a reset or a refused connection is a failure
                status = f"error: {e}"
            with self.lock:
                self.results.append((rid, "stream" if stream else "plain", status, complete, time.perf_counter() - t0))

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join()


def main():
    binary = os.path.join(ROOT, "target/release/inferd")
    if "--bin" in sys.argv:
        binary = sys.argv[sys.argv.index("--bin") + 1]
    if os.geteuid() != 0:
        raise SystemExit("FAIL: needs root for ip netns")
    work = tempfile.mkdtemp(prefix="inferd-cluster-")
    setup_network()
    replicas = [Replica(i, binary, work) for i in range(1, ZONES + 1)]
    lb = None
    try:
        for r in replicas:
            r.start()
        for r in replicas:
            wait(r.ready, 120, f"az{r.i} ready")
        with open(f"{work}/haproxy.cfg", "w") as f:
            f.write(haproxy_config(work))
        lb = subprocess.Popen(["haproxy", "-f", f"{work}/haproxy.cfg", "-db"], stdout=subprocess.DEVNULL,
                              stderr=open(f"{work}/haproxy.log", "w"))
        wait(lambda: os.path.exists(f"{work}/haproxy.sock") and set(lb_states(work).values()) == {"UP"}, 60,
             "every server UP at the balancer")
        rolls = []
        with Load() as load:
            time.sleep(10)
            roll_start = time.perf_counter()
            for r in replicas:
                t0 = time.time()
                r.proc.send_signal(signal.SIGTERM)
                noticed = wait(lambda: lb_states(work).get(f"az{r.i}") != "UP", 60, f"a failed check of az{r.i}")
                out = noticed + wait(lambda: lb_states(work).get(f"az{r.i}") == "DOWN", 60, f"az{r.i} out of rotation")
                code = r.proc.wait(DRAIN_TIMEOUT_S + 30)
                drained = time.time() - t0
                r.start()
                back = wait(lambda: lb_states(work).get(f"az{r.i}") == "UP", 180, f"az{r.i} back UP") + drained
                rolls.append({"replica": f"az{r.i}", "exit_code": code,
                              "first_failed_check_s": round(noticed, 1), "out_of_rotation_s": round(out, 1), "sigterm_to_exit_s": round(drained, 1),
                              "sigterm_to_serving_again_s": round(back, 1)})
            roll_secs = time.perf_counter() - roll_start
            time.sleep(5)
        results = load.results
        # The ledgers: every client-successful request exactly once across the replicas.
        time.sleep(1)
        counts = {}
        for r in replicas:
            db = sqlite3.connect(f"file:{r.ledger}?mode=ro", uri=True)
            for (rid,) in db.execute("SELECT request_id FROM usage WHERE request_id LIKE 'roll-%'"):
                counts[rid] = counts.get(rid, 0) + 1
            db.close()
        failed = [x for x in results if x[2] != 200 or not x[3]]
        ok = [x for x in results if x[2] == 200 and x[3]]
        not_once = [x[0] for x in ok if counts.get(x[0], 0) != 1]
        extra = [rid for rid, n in counts.items() if n > 1]
        lat = sorted(x[4] for x in ok)
        report = {
            "requests": len(results), "streams": sum(1 for x in results if x[1] == "stream"), "failed": len(failed),
            "roll_seconds": round(roll_secs, 1),
            "latency_p50_s": round(lat[len(lat) // 2], 3) if lat else None,
            "latency_p99_s": round(lat[min(len(lat) - 1, int(0.99 * (len(lat) - 1)))], 3) if lat else None,
            "metered_exactly_once": len(ok) - len(not_once), "not_metered_once": len(not_once), "metered_twice": len(extra),
            "rolls": rolls,
        }
        print(json.dumps(report, indent=1))
        problems = []
        if failed:
            problems.append(f"{len(failed)} failed requests, e.g. {failed[:3]}")
        if not_once or extra:
            problems.append(f"metering: {len(not_once)} not exactly once, {len(extra)} twice")
        late = [x for x in rolls if x["out_of_rotation_s"] >= DRAIN_DELAY_S]
        if late:
            problems.append(f"the balancer took a replica out only after its drain delay ({DRAIN_DELAY_S} s): {late}")
        if any(x["exit_code"] != 0 for x in rolls):
            problems.append(f"a replica exited non-zero: {rolls}")
        for p in problems:
            print("FAIL", p)
        print("PASS rolling restart" if not problems else "FAIL rolling restart")
        sys.exit(1 if problems else 0)
    finally:
        if lb:
            lb.terminate()
        for r in replicas:
            if r.proc and r.proc.poll() is None:
                r.proc.kill()
        teardown_network()


if __name__ == "__main__":
    main()
