# `make demo` and `make test` are the two commands README.md documents.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-lowest bench bench-scale bench-scale-10k lint format clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# RabbitMQ on 127.0.0.1:5672; with PostgreSQL on 127.0.0.1:5432 (database test, or
# HOOKLINE_DEMO_DATABASE_URL) also the control plane, in a schema it creates and drops.
demo: venv
	$(BIN)/python examples/demo.py

test: venv
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The unit tests against the lowest dependency versions pyproject.toml allows, so that its
# floors stay true (CI runs this). uv resolves each direct dependency to its floor.
LOWEST := .venv-lowest
UNIT_TESTS := tests/test_settings.py tests/test_envelope.py tests/test_headers.py \
	tests/test_netguard.py tests/test_delivery.py tests/test_retry.py tests/test_signing.py \
	tests/test_logs.py tests/test_metrics.py tests/test_circuit.py tests/test_consumer.py \
	tests/test_publisher.py tests/test_recorder.py tests/test_ratelimit.py tests/test_dlq.py \
	tests/test_secretbox.py tests/test_filters.py tests/test_migrate.py tests/test_api.py
test-lowest: venv
	$(BIN)/python -m pip install --quiet uv
	test -x $(LOWEST)/bin/python || $(BIN)/uv venv --quiet --python $(PYTHON) $(LOWEST)
	$(BIN)/uv pip install --quiet --python $(LOWEST)/bin/python --resolution lowest-direct -e '.[test]'
	$(LOWEST)/bin/python -m pytest -m "not broker_faults and not slow" $(UNIT_TESTS)

# Loopback-only benchmarks against the naive loop (about 25 minutes; BENCH_ARGS=--quick for 5),
# then scenario (h) "endpoint count" for 100 and 1,000 endpoints (bench/scale.py; SCALE_ARGS
# adds options, e.g. SCALE_ARGS='--queue-type classic'). `make bench-scale-10k` runs 10,000.
SCALE_JSON = bench/results/scale-$(shell date -u +%Y%m%dT%H%M%SZ)
bench: venv
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	$(BIN)/python -m bench.run $(BENCH_ARGS)
	$(BIN)/python -m bench.scale --endpoints 100 --endpoints 1000 --json $(SCALE_JSON).json $(SCALE_ARGS)
	$(BIN)/python -m bench.registry --json $(REGISTRY_JSON) $(REGISTRY_ARGS)

bench-scale: venv
	$(BIN)/python -m bench.scale --endpoints 100 --endpoints 1000 --json $(SCALE_JSON).json $(SCALE_ARGS)

# One worker with 10,000 endpoints on the local RabbitMQ node (several minutes; needs a broker
# nothing else is loading, and about 2 GB of broker memory).
bench-scale-10k: venv
	$(BIN)/python -m bench.scale --endpoints 10000 --json $(SCALE_JSON)-10k.json $(SCALE_ARGS)

# Scenario (j) "registry" (bench/registry.py), also the last step of `make bench`: the API and
# two workers following the registry, 10,000 endpoints registered through the API, API
# latency, 100 URL changes followed to both workers (5 to 10 minutes on 2 CPUs; needs the
# local PostgreSQL and RabbitMQ). REGISTRY_ARGS adds options, e.g. '--endpoints 1000'.
REGISTRY_JSON = bench/results/registry-$(shell date -u +%Y%m%dT%H%M%SZ).json
.PHONY: bench-registry
bench-registry: venv
	$(BIN)/python -m bench.registry --json $(REGISTRY_JSON) $(REGISTRY_ARGS)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/bandit -q -r producer worker api --severity-level medium

format: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) $(LOWEST) .mypy_cache .pytest_cache .ruff_cache *.egg-info
