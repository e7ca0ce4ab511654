# `make run` and `make test` set themselves up on a machine with only python3 and make.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: run test lint fuzz bench bench-deps clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	mkdir -p var
	$(BIN)/gsmtp serve -c configuration.toml

test: $(STAMP)
	$(BIN)/pytest -q -p no:cacheprovider

# atheris (libFuzzer) over the protocol session and the address parser, FUZZ_SECONDS each.
# A crash is saved as var/fuzz/crash-<sha1>; `python tests/fuzz/fuzz_session.py FILE` replays
# it; copy it to tests/fuzz/crashes/session-<name> to keep it as a pytest regression.
FUZZ_SECONDS ?= 30
fuzz: $(STAMP)
	mkdir -p var/fuzz/session var/fuzz/address
	$(BIN)/python tests/fuzz/fuzz_session.py -max_total_time=$(FUZZ_SECONDS) \
		-artifact_prefix=var/fuzz/ -dict=tests/fuzz/smtp.dict var/fuzz/session tests/fuzz/seeds/session
	$(BIN)/python tests/fuzz/fuzz_address.py -max_total_time=$(FUZZ_SECONDS) \
		-artifact_prefix=var/fuzz/ var/fuzz/address tests/fuzz/seeds/address

lint: $(STAMP)
	$(BIN)/ruff check gsmtp tests bench
	$(BIN)/ruff format --check gsmtp tests bench
	$(BIN)/mypy gsmtp

bench: $(STAMP)
	$(BIN)/python -m bench.compare

# Postfix: the discard, local(8) Maildir and relaying peers, smtp-sink and smtp-source
# (the end-to-end cells need nothing else: the sink and the probe are in bench/).
bench-deps:
	echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postfix

clean:
	rm -rf $(VENV) var
