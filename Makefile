# cockpit-agent. `make demo` and `make test` work on a fresh Debian-like machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: venv redis-server test demo run lint clean chaos

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.txt -r requirements-dev.txt
	touch $@

# The tests and the demo start their own redis-server processes; install it when missing.
redis-server:
	@command -v redis-server >/dev/null 2>&1 || { \
		echo "redis-server not found; installing it with apt-get"; \
		$(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; }
	@command -v redis-server >/dev/null 2>&1 && command -v git >/dev/null 2>&1 || { \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq git redis-server >/dev/null; }

test: venv redis-server
	$(BIN)/python -m pytest $(PYTEST_ARGS)

demo: venv redis-server
	$(BIN)/python scripts/demo.py

run: venv
	$(BIN)/python agent.py run

lint: venv
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis

# Long chaos runs: `make chaos ITERATIONS=200` (SEED=n replays one schedule). Prints the figures
# and the seed of any failure.
ITERATIONS ?= 20
chaos: venv redis-server
	CHAOS_ITERATIONS=$(ITERATIONS) $(if $(SEED),CHAOS_SEED=$(SEED)) \
		$(BIN)/python -m pytest tests/test_chaos.py -k test_chaos_schedule -p no:randomly -q $(PYTEST_ARGS)
