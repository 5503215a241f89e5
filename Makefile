# cockpit-agent. `make demo` and `make test` work on a fresh Debian-like machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: venv redis-server test demo run lint clean

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.txt -r requirements-dev.txt
	touch $@

# The tests and the demo start their own redis-server processes and read the state with the
# sqlite3 shell, as operators do; install what is missing (Debian package names).
SYSTEM_TOOLS := redis-server:redis-server sqlite3:sqlite3 git:git

redis-server:
	@missing=""; for pair in $(SYSTEM_TOOLS); do \
		command -v "$${pair%%:*}" >/dev/null 2>&1 || missing="$$missing $${pair#*:}"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		$(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

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
