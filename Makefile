# The whole set-up is `make demo` or `make test`; both build .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
BUILD  := build
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test lint bench fuzz prove check-platform clean

check-platform:
	@[ "$$(uname -s)/$$(uname -m)" = "Linux/x86_64" ] || \
	  { echo "emuprobe: needs Linux on x86-64 (this is $$(uname -s)/$$(uname -m))" >&2; exit 1; }

$(STAMP): pyproject.toml | check-platform
	@command -v gcc >/dev/null || { echo "emuprobe: gcc is needed to build fixtures" >&2; exit 1; }
	[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

$(BUILD)/demo: examples/demo.c
	mkdir -p $(BUILD)
	gcc -O1 -g -o $@ $<

# Trace the demo twice with ASLR off (so addresses are comparable): once
# printing each hit, once counting; then show its maps equal an untraced run's.
demo: $(STAMP) $(BUILD)/demo
	@echo "== events: emuprobe trace add_to_total read_total -- $(BUILD)/demo 5"
	EMUPROBE_DEMO_MAPS=$(BUILD)/maps.traced setarch -R \
	  $(BIN)/emuprobe trace add_to_total read_total -- $(BUILD)/demo 5
	@echo "== count summary: emuprobe trace --count ... -- $(BUILD)/demo 100000"
	$(BIN)/emuprobe trace --count add_to_total read_total -- $(BUILD)/demo 100000
	@echo "== address space: /proc/PID/maps, traced vs untraced"
	EMUPROBE_DEMO_MAPS=$(BUILD)/maps.untraced setarch -R $(BUILD)/demo 5 >/dev/null
	diff $(BUILD)/maps.untraced $(BUILD)/maps.traced && \
	  echo "maps identical: $$(wc -l < $(BUILD)/maps.traced) mappings, no [uprobes] or other VMA added"

lint: $(STAMP)
	$(BIN)/ruff check $(wildcard emuprobe tests fuzz benchmarks)
	$(BIN)/mypy emuprobe

test: $(STAMP) lint
	$(BIN)/python -m pytest -q

# Long differential campaigns (not part of `make test`): emulator against the
# CPU on FUZZ_EXAMPLES cases per core, then lockstep over six real programs
# (ls, python3, gzip, sqlite3, git, xz: installed here when missing).
FUZZ_EXAMPLES ?= 100000
FUZZ_SEED ?= 2
fuzz: $(STAMP)
	-command -v sqlite3 >/dev/null && command -v git >/dev/null && command -v xz >/dev/null && \
	  command -v gzip >/dev/null || \
	  { apt-get update -qq && apt-get install -y -qq sqlite3 git xz-utils gzip; } >/dev/null 2>&1
	$(BIN)/python fuzz/campaign.py --examples $(FUZZ_EXAMPLES) --seed $(FUZZ_SEED) --lockstep

# Prove this CPU (see README "Differential testing"): what the tracer may
# emulate here, written to $$XDG_CACHE_HOME/emuprobe/trust.json.
prove: $(STAMP)
	$(BIN)/emuprobe difftest --prove

# The benchmark suite (not part of `make test`): matplotlib and rich from the
# `bench` extra; the peers it compares with are installed when apt-get works
# and skipped with a note otherwise.
BENCH_STAMP := $(VENV)/.bench-stamp
$(BENCH_STAMP): $(STAMP)
	$(BIN)/pip install -q -e '.[test,bench]'
	-command -v ltrace >/dev/null && command -v bpftrace >/dev/null || \
	  { apt-get update -qq && apt-get install -y -qq ltrace bpftrace gdb; } >/dev/null 2>&1
	touch $@

bench: $(BENCH_STAMP)
	$(BIN)/python -m benchmarks $(BENCH_ARGS)

clean:
	rm -rf $(BUILD) $(VENV) .pytest_cache .mypy_cache .ruff_cache emuprobe/_hotloop*.so
