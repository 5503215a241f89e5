# cockpit-agent. `make demo` and `make test` work on a fresh Debian-like machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: venv redis-server systemd-analyze test demo run lint clean install uninstall

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

# The unit's hardening test runs `systemd-analyze security --offline=true`; it comes with systemd.
systemd-analyze:
	@command -v systemd-analyze >/dev/null 2>&1 || { \
		echo "systemd-analyze not found; installing systemd with apt-get"; \
		$(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd >/dev/null; }

test: venv redis-server systemd-analyze
	$(BIN)/python -m pytest $(PYTEST_ARGS)

demo: venv redis-server
	$(BIN)/python scripts/demo.py

run: venv
	$(BIN)/python agent.py run

# As root on a Debian/Ubuntu host: user, app and venv in /opt/cockpit-agent, agent.env (kept if
# present), state dir, unit, `cockpit-agent` command, daemon-reload + enable. Safe to repeat.
# DESTDIR=/some/dir stages it all there instead (no user, chown or systemctl); INSTALL_VENV=0
# skips the venv. The venv uses the system python3, not a developer's pyenv or .venv.
INSTALL_PYTHON ?= $(shell [ -x /usr/bin/python3 ] && echo /usr/bin/python3 || echo python3)
install:
	DESTDIR="$(DESTDIR)" PYTHON="$(INSTALL_PYTHON)" INSTALL_VENV="$(or $(INSTALL_VENV),1)" sh scripts/install.sh

# Removes the app, unit and command; keeps /var/lib/cockpit-agent and /etc/cockpit-agent unless PURGE=1.
uninstall:
	DESTDIR="$(DESTDIR)" PURGE="$(or $(PURGE),0)" sh scripts/uninstall.sh

lint: venv
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
