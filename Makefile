# `make run` and `make test` set themselves up on a machine with only python3 and make.
# `make run` installs only what the server needs; the development tools (pytest, mypy,
# ruff, matplotlib, atheris...) come with the first `make test`, `lint`, `fuzz` or `bench`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUN_STAMP := $(VENV)/.runtime-stamp
DEV_STAMP := $(VENV)/.dev-stamp

.PHONY: run test lint fuzz bench bench-deps clean

$(RUN_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e .
	touch $(RUN_STAMP)

$(DEV_STAMP): $(RUN_STAMP)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(DEV_STAMP)

run: $(RUN_STAMP)
	mkdir -p var
	$(BIN)/gsmtp serve -c configuration.toml

# The suite on TEST_WORKERS pytest-xdist processes: most of its time is spent waiting
# on the servers the integration tests start. `--dist loadgroup` keeps the tests marked
# xdist_group("heavy") (memory measured, hundreds of MB written) on one worker.
TEST_WORKERS ?= 2
test: $(DEV_STAMP)
	$(BIN)/pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadgroup

# atheris (libFuzzer) over the protocol session and the address parser, FUZZ_SECONDS each.
# A crash is saved as var/fuzz/crash-<sha1>; `python tests/fuzz/fuzz_session.py FILE` replays
# it; copy it to tests/fuzz/crashes/session-<name> to keep it as a pytest regression.
FUZZ_SECONDS ?= 30
fuzz: $(DEV_STAMP)
	mkdir -p var/fuzz/session var/fuzz/address
	$(BIN)/python tests/fuzz/fuzz_session.py -max_total_time=$(FUZZ_SECONDS) \
		-artifact_prefix=var/fuzz/ -dict=tests/fuzz/smtp.dict var/fuzz/session tests/fuzz/seeds/session
	$(BIN)/python tests/fuzz/fuzz_address.py -max_total_time=$(FUZZ_SECONDS) \
		-artifact_prefix=var/fuzz/ var/fuzz/address tests/fuzz/seeds/address

lint: $(DEV_STAMP)
	$(BIN)/ruff check gsmtp tests bench
	$(BIN)/ruff format --check gsmtp tests bench
	$(BIN)/mypy gsmtp

bench: $(DEV_STAMP)
	$(BIN)/python -m bench.compare

# Postfix: the discard, local(8) Maildir and relaying peers, smtp-sink and smtp-source
# (the end-to-end cells need nothing else: the sink and the probe are in bench/).
bench-deps:
	echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postfix

clean:
	rm -rf $(VENV) var
