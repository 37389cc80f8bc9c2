# qmgrd — make run: the mail system on the bundled etc/; make test: the suite.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TSTAMP := $(VENV)/.installed-test

.PHONY: run test lint bench install clean stop status

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q -e .
	touch $@

$(TSTAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e '.[test]'
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
	$(BIN)/qmgr-master -c etc start --foreground

stop: $(STAMP)
	$(BIN)/qmgr-master -c etc stop

status: $(STAMP)
	$(BIN)/qmgr-master -c etc status

## make test: install the test dependencies and run the suite
test: $(TSTAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider

lint: $(TSTAMP)
	$(BIN)/ruff check master qmgrd transports tests
	$(BIN)/mypy master qmgrd transports
	$(BIN)/lint-imports

## make bench: qmgrd vs Postfix (drain, qmgr RSS, deferred scan) and the master's idle
## cost; prints a table, writes bench/results.json (bench/README.md). BENCH_SCALE=0.1 for
## a quick run. The Postfix side needs root and Debian's postfix.
bench: $(STAMP)
	$(BIN)/python bench/run.py

clean:
	rm -rf var build *.egg-info
