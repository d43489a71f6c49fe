# pgtrickle-relay — every task a developer or CI runs.
PREFIX ?= /usr/local
CARGO  ?= cargo
STATIC_ARCH ?= x86_64
STATIC_TARGET_MUSL := $(STATIC_ARCH)-unknown-linux-musl
STATIC_TARGET_GNU  := $(STATIC_ARCH)-unknown-linux-gnu

.PHONY: all build release demo deps test soak lint bench static image test-image install clean

all: build

build:
	$(CARGO) build

release:
	$(CARGO) build --release

## The demo: a throwaway PostgreSQL, an outbox, events relayed to stdout.
demo:
	@scripts/demo.sh

deps:
	@scripts/install-deps.sh

## The whole test suite (installs what it needs first).
test: deps
	$(CARGO) test --no-fail-fast

## The fault-injection suite (tests/faults.rs), longer than in `make test`:
## SOAK_RUNS runs, each with a new seed (FAULTS_SEED=<seed> replays one).
SOAK_RUNS     ?= 3
FAULTS_ROUNDS ?= 30
FAULTS_SCALE  ?= 3
soak: deps
	@for i in $$(seq $(SOAK_RUNS)); do \
	  echo "soak run $$i of $(SOAK_RUNS)"; \
	  FAULTS_ROUNDS=$(FAULTS_ROUNDS) FAULTS_SCALE=$(FAULTS_SCALE) \
	    $(CARGO) test --test faults -- --nocapture || exit 1; \
	done

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings

## The benchmark: release build, PostgreSQL with its default durability,
## every figure beside its limit; JSON lines on stdout, progress on stderr.
## BENCH_RUNS, BENCH_ONLY and the rest: docs/benchmarks.md. Plots:
## `make bench | tee bench.jsonl && scripts/bench-plots.py bench.jsonl docs/img`.
bench: deps
	@$(CARGO) bench --bench relay
	@$(CARGO) bench --bench reverse
	@$(CARGO) bench --bench latency
	@$(CARGO) bench --bench app_cost
	@$(CARGO) bench --bench ops
	@$(CARGO) bench --bench inbox

## A fully static binary for STATIC_ARCH (default x86_64): musl (with OpenSSL
## built from source) when that target is installed, else glibc with crt-static.
## STATIC_CFLAGS: C code built by build scripts (librdkafka's own build adds
## its -O2) goes in one section per function, so the linker's --gc-sections
## drops what nothing calls. STATIC_GNU_LINK: the static-pie's relative
## relocations packed as DT_RELR (glibc >= 2.36, binutils >= 2.38) instead of
## 24 bytes each. Sizes: docs/benchmarks.md, "Footprint".
STATIC_CFLAGS   ?= -ffunction-sections -fdata-sections
STATIC_GNU_LINK ?= -C link-arg=-Wl,-z,pack-relative-relocs
static:
	@if rustup target list --installed 2>/dev/null | grep -qx '$(STATIC_TARGET_MUSL)'; then \
	  CFLAGS="$(STATIC_CFLAGS)" \
	    $(CARGO) build --release --target $(STATIC_TARGET_MUSL) --features vendored-openssl && \
	  cp target/$(STATIC_TARGET_MUSL)/release/pgtrickle-relay target/pgtrickle-relay-static; \
	else \
	  RUSTFLAGS="-C target-feature=+crt-static $(STATIC_GNU_LINK)" OPENSSL_STATIC=1 CFLAGS="$(STATIC_CFLAGS)" \
	    $(CARGO) build --release --target $(STATIC_TARGET_GNU) && \
	  cp target/$(STATIC_TARGET_GNU)/release/pgtrickle-relay target/pgtrickle-relay-static; \
	fi
	@if readelf -l target/pgtrickle-relay-static | grep -q INTERP || \
	    readelf -d target/pgtrickle-relay-static | grep -q NEEDED; then \
	  echo "target/pgtrickle-relay-static is NOT static:"; readelf -d target/pgtrickle-relay-static | grep NEEDED; exit 1; \
	fi
	@file target/pgtrickle-relay-static 2>/dev/null || true
	@echo "static binary: target/pgtrickle-relay-static ($$(du -h target/pgtrickle-relay-static | cut -f1))"

## The container image (buildah, no Docker engine): FROM scratch, the static
## binary, CA certificates, the SQL, a non-root user, a HEALTHCHECK.
image: static
	dist/image/build.sh

## Run the image for real (podman) against a throwaway PostgreSQL.
test-image: image
	scripts/test-image.sh

install: release
	./install.sh --prefix "$(PREFIX)" --binary target/release/pgtrickle-relay

clean:
	$(CARGO) clean
