# Two commands: `make serve` and `make test`. Both build .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch first, pinned: pip finds this CPU wheel locally; a bare `torch` would pull CUDA.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: serve fleet test test-fast lint typecheck bench clean sandbox-check migrations-check

# Every job runs in bubblewrap; without it the service starts but refuses jobs (503).
sandbox-check:
	@command -v bwrap >/dev/null || { echo "bwrap (bubblewrap) is not installed: no job can run." \
	  "Install it: sudo apt-get install bubblewrap (Fedora: dnf install bubblewrap)," \
	  "or set LOWERING_SANDBOX=off for trusted uploads only." >&2; \
	  [ "$(SANDBOX_OPTIONAL)" = "1" ]; }

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[worker,dev]"
	touch $(STAMP)

serve: $(STAMP)
	@$(MAKE) --no-print-directory sandbox-check SANDBOX_OPTIONAL=1
	$(BIN)/lowering-service

# The whole fleet on this machine, all real parts: RabbitMQ, PostgreSQL, an S3 server (moto),
# worker hosts host-a and host-b, API replicas on :8000 and :8001 (app/devfleet.py).
# FLEET_ARGS passes options: make fleet FLEET_ARGS="--hosts 3 --api-ports 8000,8001,8002".
fleet: $(STAMP)
	@$(MAKE) --no-print-directory sandbox-check SANDBOX_OPTIONAL=1
	$(BIN)/python -m app.devfleet $(FLEET_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check app tests bench

typecheck: $(STAMP)
	$(BIN)/mypy app

# The migrations, applied to an empty SQLite database, give exactly app/jobs/models.py.
migrations-check: $(STAMP)
	$(BIN)/python -c "from app.jobs.migrate import check_models; check_models(); \
	  print('migrations-check: models and migrations agree')"

test: lint typecheck sandbox-check migrations-check
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The fast tier (tests/unit, tests/api): no server, no AOTInductor compile; under 2 minutes.
# e2e/ and integration/ are marked slow by directory in tests/conftest.py.
test-fast: lint typecheck sandbox-check migrations-check
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python bench/bench_lowering.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
