# The two commands a newcomer needs: `make run` and `make test`.
PY := .venv/bin/python
ADDR ?= 127.0.0.1:8000
DEMO ?= 0

.PHONY: run test setup lint format install

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

lint:
	.venv/bin/ruff format --check . && .venv/bin/ruff check .

format:
	.venv/bin/ruff format . && .venv/bin/ruff check --fix .
