# Two commands for a fresh CPU-only Linux machine (both create .venv if missing):
#   make demo   set up, then quantize the trained synthetic CenterPoint-Pillar (LiDAR-PTQ W8A8, CPU budget) and export it
#   make test   set up, then run the test suite (fast tests; `make test-all` adds slow ones)
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-all lint

setup:
	bash tools/setup_env.sh

demo: setup
	$(PY) tools/quantize.py configs/synthetic/demo_pillar.py \
		benchmarks/models/centerpoint_pillar_synthetic.pth \
		--recipe configs/quant/ptq/lidar_ptq_w8a8_cpu.json --work-dir work_dirs/demo --export

test: setup
	LIDAR_PTQ_REQUIRE_STACK=1 $(PY) -m pytest -m "not slow"

test-all: setup
	LIDAR_PTQ_REQUIRE_STACK=1 $(PY) -m pytest

lint: setup
	$(PY) -m ruff check lidar_ptq tests tools
