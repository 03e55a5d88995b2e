# Two commands for a fresh CPU-only Linux machine (both create .venv if missing):
#   make demo   set up, then quantize the built-in demo model
#   make test   set up, then run the test suite (fast tests; `make test-all` adds slow ones)
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-all lint

setup:
	bash tools/setup_env.sh

demo: setup
	$(PY) -m lidar_ptq.demo

test: setup
	LIDAR_PTQ_REQUIRE_STACK=1 $(PY) -m pytest -m "not slow"

test-all: setup
	LIDAR_PTQ_REQUIRE_STACK=1 $(PY) -m pytest

lint: setup
	$(PY) -m ruff check lidar_ptq tests tools
