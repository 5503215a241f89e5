# cockpit-agent. `make demo` and `make test` work on a fresh Debian-like machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: chaos-cluster venv tools test fuzz chaos demo run lint clean install uninstall bench bench-profile systemd-e2e fleet soak

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.txt -r requirements-dev.txt
	touch $@

# The tests and the demo start their own redis-server processes and read the state with the
# sqlite3 shell, as operators do; the TLS tests make certificates with openssl and the unit's
# hardening test runs systemd-analyze. Install what is missing (Debian package names).
SYSTEM_TOOLS := redis-server:redis-server sqlite3:sqlite3 git:git openssl:openssl systemd-analyze:systemd

tools:
	@missing=""; for pair in $(SYSTEM_TOOLS); do \
		command -v "$${pair%%:*}" >/dev/null 2>&1 || missing="$$missing $${pair#*:}"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		$(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

# Three pytest workers (pytest-xdist): most tests wait on Redis restarts, timeouts and child
# processes (the load stays near 1 on two cores with two workers), so three at a time take
# ~3 min where two took ~4.5 (measured on this 2-core machine).
# The burst test (-m burst: 64 MB against Redis's 32 MB pub/sub limit) runs after the rest, alone:
# beside the other worker it lost the race for the CPU in some runs.
TEST_JOBS ?= 3
test: venv tools
	$(BIN)/python -m pytest -n $(TEST_JOBS) --dist loadgroup -m 'not burst' $(PYTEST_ARGS)
	$(BIN)/python -m pytest -p no:randomly -m burst $(PYTEST_ARGS)

# Long property-based runs: N examples per property (make test runs a few thousand in all).
EXAMPLES ?= 20000
fuzz: venv
	HYPOTHESIS_PROFILE=fuzz EXAMPLES=$(EXAMPLES) $(BIN)/python -m pytest tests/test_fuzz.py -o timeout=0 \
		--hypothesis-show-statistics $(PYTEST_ARGS)

# Round trips with the backend's commands, then Redis killed while a command runs: the answer
# waits in SQLite (the sqlite3 shell, `outbox list`) and is delivered once Redis is back. ~5 s.
demo: venv tools
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

# Agent vs a bare redis-py responder, side by side; under 5 minutes. BENCH_ARGS="--idle 10" etc.
bench: venv tools $(VENV)/.bench-installed
	$(BIN)/python bench/run.py $(BENCH_ARGS)

# The same, with py-spy flame graphs of the agent during echo and burst in bench/results/profile/.
bench-profile: venv tools $(VENV)/.bench-installed
	$(BIN)/python bench/run.py --profile bench/results/profile $(BENCH_ARGS)

$(VENV)/.bench-installed: bench/requirements.txt $(VENV)/.installed
	$(BIN)/pip install --quiet --disable-pip-version-check -r bench/requirements.txt
	touch $@

lint: venv
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis

# The installed agent under a real systemd: a Debian container booted with systemd-nspawn, make
# install in it, then the README's steps and what only systemd shows. As root, with network;
# about 75 s the first time (debootstrap), 30 s after. Not part of `make test`.
systemd-e2e: tools
	bash scripts/systemd-e2e.sh

# N real agents on one private redis-server: connections, idle commands, memory, keys, broadcast
# and restart times, per agent and x 10,000 (bench/fleet.py); under 5 minutes for N=100.
N ?= 100
fleet: venv tools
	$(BIN)/python bench/fleet.py -n $(N) $(FLEET_ARGS)

# A year of health checks in a few minutes: N commands (1,000,000 unless N= is given), one per
# simulated 30 s, through the real Store and its pruning (COMMAND_RETENTION 7 days); prints the
# bound on the file's size it checks and the figures (bench/soak.py). SOAK_ARGS="--outage 0" etc.
soak: venv
	$(BIN)/python bench/soak.py -n $(if $(filter command line environment,$(origin N)),$(N),1000000) $(SOAK_ARGS)

# Long chaos runs: `make chaos ITERATIONS=200` (SEED=n replays one schedule). Prints the figures
# and the seed of any failure.
ITERATIONS ?= 20
chaos: venv tools
	CHAOS_ITERATIONS=$(ITERATIONS) $(if $(SEED),CHAOS_SEED=$(SEED)) \
		$(BIN)/python -m pytest tests/system/test_chaos.py -k test_chaos_schedule -p no:randomly -q $(PYTEST_ARGS)

# The same schedules against a local Redis Cluster (3 masters, 3 replicas): each Redis kill is a
# master's SIGKILL and its replica's failover. `make chaos-cluster ITERATIONS=5`.
chaos-cluster: venv tools
	CHAOS_CLUSTER=1 CHAOS_ITERATIONS=$(ITERATIONS) $(if $(SEED),CHAOS_SEED=$(SEED)) \
		$(BIN)/python -m pytest tests/system/test_chaos.py -k test_chaos_schedule -p no:randomly -q $(PYTEST_ARGS)
