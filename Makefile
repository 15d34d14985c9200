# The README's commands. `make demo` runs the whole stack with a demo model;
# `make test` runs every check CI runs. Both set up .venv first when needed.
PY := .venv/bin/python
STAMP := .venv/.ferry-setup

.PHONY: setup protos protos-check docs docs-check lint format test test-random test-unit test-integration test-e2e demo bench clean

$(STAMP): pyproject.toml constraints.txt tools/setup.sh
	bash tools/setup.sh

setup: $(STAMP)

protos: $(STAMP)
	$(PY) tools/gen_protos.py

protos-check: $(STAMP)
	$(PY) tools/gen_protos.py --check

docs: $(STAMP)
	$(PY) tools/settings_table.py --write

docs-check: $(STAMP)
	$(PY) tools/settings_table.py --check
	$(PY) tools/docs_check.py

lint: $(STAMP)
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy

format: $(STAMP)
	.venv/bin/ruff check --fix .
	.venv/bin/ruff format .

test: protos-check docs-check lint
	$(PY) -m pytest -q -p no:cacheprovider -p no:randomly tests

# The unit and integration tests again in a random order (pytest-randomly; the seed is printed,
# and `make test-random SEED=N` replays one): no test may depend on another having run first.
# The e2e tests each start whole stacks of their own, and twice the suite would not fit CI's time;
# for the same reason the slowest tests that start all their servers themselves (marker `solo`)
# run in the file-order pass only: they share nothing another test could leave behind.
test-random: $(STAMP)
	@seed=$${SEED:-$$(date +%s)}; echo "random order, seed $$seed (replay: make test-random SEED=$$seed)"; \
	$(PY) -m pytest -q -p no:cacheprovider -p randomly --randomly-seed=$$seed -m "not solo" tests/unit tests/integration

test-unit: $(STAMP)
	$(PY) -m pytest -q tests/unit

test-integration: $(STAMP)
	$(PY) -m pytest -q tests/integration

test-e2e: $(STAMP)
	$(PY) -m pytest -q tests/e2e

demo: $(STAMP)
	.venv/bin/ferry demo

bench: $(STAMP)
	.venv/bin/ferry bench

clean:
	rm -rf .venv .pytest_cache .ruff_cache .ferry
