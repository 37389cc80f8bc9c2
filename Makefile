# qmgrd — make run: the mail system on the bundled etc/; make test: the suite.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TSTAMP := $(VENV)/.installed-test

.PHONY: run test lint bench install clean stop status

# Python 3.11's venv brings setuptools, whose distutils-precedence.pth is run by every
# Python process started from the venv: about 2.2 million instructions, 5 % of a
# qmgr-sendmail run (issue 8, scenario B). Nothing needs setuptools at run time (pip
# builds the project in an isolated environment), so it goes.
$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip uninstall -q -y setuptools 2>/dev/null || true

# Editable install in "compat" mode (a plain .pth path entry: no import hook that costs
# every Python process ~10 ms), and the bytecode written once (PYTHONDONTWRITEBYTECODE
# may be set, and qmgr-sendmail starts once per message: issue 8, scenario B); again by
# run, test and bench (0.1 s when nothing changed), so that a pulled change does not leave
# stale bytecode that every qmgr-sendmail and master start compiles again.
EDITABLE := --config-settings editable_mode=compat
COMPILE  := $(BIN)/python -m compileall -q master qmgrd transports

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q -e . $(EDITABLE)
	$(COMPILE)
	touch $@

$(TSTAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e '.[test]' $(EDITABLE)
	$(COMPILE)
	touch $@

install: $(STAMP)

## make run: start the whole mail system in the foreground on etc/ (Ctrl-C stops it).
## As root, the mail_owner account qmgrd (etc/main.cf) is created first when missing.
MAIL_OWNER := qmgrd
run: $(STAMP)
	@if [ "$$(id -u)" = 0 ] && ! getent passwd $(MAIL_OWNER) >/dev/null; then \
	  echo "make run: creating the system account $(MAIL_OWNER) (mail_owner in etc/main.cf)"; \
	  useradd --system --no-create-home --home-dir /nonexistent \
	    --shell /usr/sbin/nologin $(MAIL_OWNER); \
	fi
	@mkdir -p var/log
	@$(COMPILE)
	$(BIN)/qmgr-master -c etc start --foreground

stop: $(STAMP)
	$(BIN)/qmgr-master -c etc stop

status: $(STAMP)
	$(BIN)/qmgr-master -c etc status

## make test: install the test dependencies and run the suite
test: $(TSTAMP)
	@$(COMPILE)
	$(BIN)/python -m pytest -q -p no:cacheprovider

lint: $(TSTAMP)
	$(BIN)/ruff check master qmgrd transports tests
	$(BIN)/mypy master qmgrd transports
	$(BIN)/lint-imports

## make bench: qmgrd vs a private Postfix, side by side (issue 8: scenarios A, H, C, B,
## M, the H scale points and the qmgr's RSS with 100,000 deferred; under 15 minutes);
## prints a table with the targets, writes bench/results.jsonl (one line per round) and
## bench/results.json (bench/README.md). BENCH_SCALE=0.1 for a quick run; BENCH_ARGS
## passes options to bench/run.py (e.g. --only drain,scan). Postfix needs root + Debian's
## postfix.
bench: $(STAMP)
	$(COMPILE)
	$(BIN)/python bench/run.py $(BENCH_ARGS)

clean:
	rm -rf var build *.egg-info
