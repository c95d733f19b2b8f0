"""The official openai package against a server with tenants: its API key
authenticates, a wrong one raises AuthenticationError, and going over the
tenant's requests per minute raises RateLimitError with our headers.
Usage: python tests/openai_tenants.py BASE_URL (ending in /v1) KEY LIMIT"""
import sys

import openai

base, key, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])

try:
    openai.OpenAI(base_url=base, api_key="sk-wrong", max_retries=0).models.list()
    raise SystemExit("a wrong key was accepted")
except openai.AuthenticationError as e:
    assert e.status_code == 401 and e.code == "invalid_api_key", e.body

client = openai.OpenAI(base_url=base, api_key=key, max_retries=0)
model = client.models.list().data[0].id
for i in range(limit):
    raw = client.completions.with_raw_response.create(model=model, prompt="Hi", max_tokens=2)
    assert raw.http_response.status_code == 200
    assert raw.headers["x-ratelimit-limit-requests"] == str(limit), dict(raw.headers)
    assert raw.headers["x-ratelimit-remaining-requests"] == str(limit - 1 - i), dict(raw.headers)
    assert raw.parse().usage.total_tokens > 0
try:
    client.completions.create(model=model, prompt="Hi", max_tokens=2)
    raise SystemExit("the rate limit was not applied")
except openai.RateLimitError as e:
    assert e.status_code == 429 and e.code == "rate_limit_exceeded", e.body
    assert e.body["limit"] == "requests_per_minute", e.body
    assert int(e.response.headers["retry-after"]) >= 1
print("all openai tenant checks passed")
