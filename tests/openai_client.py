"""Drives inferd with the official openai package: both routes, streamed
and not. Usage: python tests/openai_client.py BASE_URL (ending in /v1)."""
import sys

import openai

client = openai.OpenAI(base_url=sys.argv[1], api_key="unused", max_retries=0)
model = client.models.list().data[0].id

c = client.completions.create(model=model, prompt="The sky is", max_tokens=8, temperature=0)
assert c.choices[0].text, c
assert c.usage.completion_tokens >= 1, c.usage

parts = list(client.completions.create(model=model, prompt="The sky is", max_tokens=8, temperature=0, stream=True))
assert "".join(p.choices[0].text for p in parts if p.choices) == c.choices[0].text

chat = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "Say hello."}], max_tokens=10, temperature=0
)
answer = chat.choices[0].message.content
assert answer and chat.choices[0].message.role == "assistant", chat

stream = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Say hello."}],
    max_tokens=10,
    temperature=0,
    stream=True,
    stream_options={"include_usage": True},
)
chunks = list(stream)
text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
assert text == answer, (text, answer)
assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == chat.usage.completion_tokens

try:
    client.chat.completions.create(model=model, messages=[], max_tokens=5)
    raise SystemExit("empty messages were accepted")
except openai.BadRequestError as e:
    assert e.status_code == 400

print("all openai client checks passed")
