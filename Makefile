# The two commands a newcomer needs: `make run` and `make test`.
PY := .venv/bin/python
ADDR ?= 127.0.0.1:8000
DEMO ?= 0

.PHONY: run test setup lint format install bench-smoke

setup:
	./scripts/setup-host.sh

run: setup
	./scripts/run.sh $(ADDR) $(DEMO)

# Install or upgrade the service under /opt/vmbackup (README "Deploy"); as root.
install:
	./scripts/install.sh $(INSTALL_ARGS)

test:
	./scripts/setup-host.sh --test
	.venv/bin/ruff format --check .
	.venv/bin/ruff check .
	.venv/bin/pytest $(PYTEST_ARGS)
	./scripts/test-postgres.sh

# Every bench/ script at its smallest size, one round: it must finish and print its last
# line (tests/test_bench_smoke.py, ~2-3 min). `make test` runs it with the rest of pytest.
bench-smoke:
	.venv/bin/pytest -q -p no:cacheprovider tests/test_bench_smoke.py

lint:
	.venv/bin/ruff format --check . && .venv/bin/ruff check .

format:
	.venv/bin/ruff format . && .venv/bin/ruff check --fix .
