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

# The tests and the demo start their own redis-server processes and read the state with the
# sqlite3 shell, as operators do; install what is missing (Debian package names).
SYSTEM_TOOLS := redis-server:redis-server sqlite3:sqlite3 git:git openssl:openssl

redis-server:
	@missing=""; for pair in $(SYSTEM_TOOLS); do \
		command -v "$${pair%%:*}" >/dev/null 2>&1 || missing="$$missing $${pair#*:}"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		$(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

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
