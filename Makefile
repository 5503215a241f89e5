# cockpit-agent. `make demo` and `make test` work on a fresh Debian-like machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: venv redis-server test demo run lint clean bench bench-profile

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

# Agent vs a bare redis-py responder, side by side; under 5 minutes. BENCH_ARGS="--idle 10" etc.
bench: venv redis-server $(VENV)/.bench-installed
	$(BIN)/python bench/run.py $(BENCH_ARGS)

# The same, with py-spy flame graphs of the agent during echo and burst in bench/results/profile/.
bench-profile: venv redis-server $(VENV)/.bench-installed
	$(BIN)/python bench/run.py --profile bench/results/profile $(BENCH_ARGS)

$(VENV)/.bench-installed: bench/requirements.txt $(VENV)/.installed
	$(BIN)/pip install --quiet --disable-pip-version-check -r bench/requirements.txt
	touch $@

lint: venv
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
