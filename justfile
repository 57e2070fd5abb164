# jobcast tasks. Needs just >= 1.27 (recipe groups). First time:
#   python3 -m venv .venv && .venv/bin/pip install -e ".[dev]"

set shell := ["bash", "-euo", "pipefail", "-c"]

venv := ".venv/bin"

# list the recipes
[group('help')]
default:
    @just --list --unsorted

# run NATS, the API and one worker per pool on http://127.0.0.1:8000
[group('run')]
serve *args:
    {{ venv }}/jobcast serve {{ args }}

# run the test suite (extra pytest arguments pass through)
[group('check')]
test *args:
    {{ venv }}/pytest {{ args }}

# the quick loop: the tests without the chaos, browser and slow ones (under two minutes)
[group('check')]
quick *args:
    {{ venv }}/pytest -m "not chaos and not browser and not slow" {{ args }}

# refresh the UI screenshots in docs/img (the browser tests save them there)
[group('check')]
screenshots:
    JOBCAST_UI_SHOTS=docs/img {{ venv }}/pytest tests/test_ui.py -q

# ruff check and ruff format --check
[group('check')]
lint:
    {{ venv }}/ruff check .
    {{ venv }}/ruff format --check .

# mypy --strict over app, workers, streams and jobcast
[group('check')]
typecheck:
    {{ venv }}/mypy

# format the code and apply ruff's safe fixes
[group('check')]
fmt:
    {{ venv }}/ruff check --fix .
    {{ venv }}/ruff format .

# run the benchmarks in bench/ (python -m bench)
[group('check')]
bench *args:
    #!/usr/bin/env bash
    set -euo pipefail
    if [ -f bench/__main__.py ]; then
        exec {{ venv }}/python -m bench {{ args }}
    fi
    echo "benchmarks are not written yet (no bench/__main__.py)" >&2
    exit 1

# start NATS, the API and the workers with Docker Compose (compose.yaml)
[group('deploy')]
up *args:
    docker compose up -d {{ args }}

# stop the Compose services (volumes are kept; `just down -v` removes them)
[group('deploy')]
down *args:
    docker compose down {{ args }}
