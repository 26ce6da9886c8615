# One command sets everything up and runs the demo; one sets everything up and runs the tests.
PYTHON ?= python3
PIP = $(PYTHON) -m pip
STAMP = .cache/setup.stamp

.PHONY: setup demo test test-rust bench-engine proto

$(STAMP): requirements.txt pyproject.toml $(shell find retriever_rs -name '*.rs' -o -name Cargo.toml | grep -v target)
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q --no-build-isolation --no-deps -e .
	@mkdir -p .cache && touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(PYTHON) -m rest.cli demo

test: setup test-rust
	$(PYTHON) -m pytest -q

test-rust:
	cd retriever_rs && cargo test --release -q -p rest-retriever

bench-engine: setup
	$(PYTHON) -m bench.engine

proto: setup
	$(PYTHON) scripts/gen_proto.py
