#!/usr/bin/env python3
"""Time to first token and decode speed of one streamed request.

Usage: python3 benches/stream_latency.py [BASE_URL] [MAX_TOKENS]
Streams a chat completion from a running inferd (default
http://127.0.0.1:8080) with ignore_eos, and prints time to first token,
tokens per second after it, and the whole request's time. Standard library only.
"""
import http.client
import json
import sys
import time
import urllib.parse

base = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8080"
max_tokens = int(sys.argv[2]) if len(sys.argv) > 2 else 128
url = urllib.parse.urlparse(base)
body = json.dumps({
    "messages": [{"role": "user", "content": "Write a short story about a lighthouse keeper."}],
    "max_tokens": max_tokens,
    "ignore_eos": True,
    "temperature": 0,
    "stream": True,
    "stream_options": {"include_usage": True},
    "logprobs": True,
})
conn = http.client.HTTPConnection(url.hostname, url.port or 80, timeout=600)
start = time.perf_counter()
conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
resp = conn.getresponse()
assert resp.status == 200, resp.read()
first = None
tokens = 0
usage = None
for raw in resp:
    line = raw.decode().strip()
    if not line.startswith("data: ") or line == "data: [DONE]":
        continue
    chunk = json.loads(line[6:])
    if chunk.get("usage"):
        usage = chunk["usage"]
    for choice in chunk.get("choices", []):
        n = len((choice.get("logprobs") or {}).get("content") or [])
        if n and first is None:
            first = time.perf_counter()
        tokens += n
end = time.perf_counter()
ttft = first - start
print(f"prompt tokens {usage['prompt_tokens']}, completion tokens {tokens}")
print(f"time to first token {ttft * 1000:.0f} ms")
print(f"decode {(tokens - 1) / (end - first):.1f} tok/s after the first token; whole request {end - start:.2f} s")
