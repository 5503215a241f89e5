# cockpit-agent. `make demo` and `make test` work on a fresh Debian-like machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: venv redis-server test fuzz demo run lint clean

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
	@command -v redis-server >/dev/null 2>&1 && command -v git >/dev/null 2>&1 && command -v openssl >/dev/null 2>&1 || { \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq git redis-server openssl >/dev/null; }

test: venv redis-server
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Long property-based runs: N examples per property (make test runs a few thousand in all).
EXAMPLES ?= 20000
fuzz: venv
	HYPOTHESIS_PROFILE=fuzz EXAMPLES=$(EXAMPLES) $(BIN)/python -m pytest tests/test_fuzz.py -o timeout=0 \
		--hypothesis-show-statistics $(PYTEST_ARGS)

demo: venv redis-server
	$(BIN)/python scripts/demo.py

run: venv
	$(BIN)/python agent.py run

lint: venv
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
