# RecursiveMix loader system. The README's two commands: `make demo` and `make test`.
# Every target that runs code depends on `setup`, so each works from a fresh clone alone; `gpu-check`
# alone runs a given Python on the repository as it is (a bare GPU machine: docs/gpu-check.md).

PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.setup-stamp

APT_PACKAGES := pkg-config libturbojpeg0-dev libopencv-dev curl

DATASET ?= digits
SRC     ?=
OUT     ?= data/shards
SHARDS_ARGS ?=
BENCH_ARGS  ?=

.PHONY: setup apt test demo shards bench clean

# apt packages FFCV compiles against (and curl, which streams http(s) shards: shards/remote.py); installed only when root and missing.
apt:
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = "0" ]; then \
	    echo "apt: installing$$missing"; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  else \
	    echo "apt: missing$$missing (not root: install them, or FFCV will not build)"; \
	  fi; \
	fi

# Idempotent: the stamp is rebuilt only when pyproject.toml or this Makefile change.
setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@$(MAKE) --no-print-directory apt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# setuptools<81 keeps pkg_resources, which mmengine (setup-mm) needs at run time
	$(PIP) install -q --upgrade pip wheel "setuptools<81"
	# torch first: ffcv and DALI's torch plugin import it at build/run time.
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	# ffcv's setup.py imports numpy/cv2 and compiles against libturbojpeg: no build isolation.
	$(PIP) install -q numpy opencv-python numba pkgconfig cython
	$(PIP) install -q --no-build-isolation ffcv==1.0.2
	$(PIP) install -q -e '.[dali,ffcv,dev]'
	@touch $(STAMP)

test: setup setup-mm
	$(PY) -m pytest -q

demo: setup
	$(VENV)/bin/rmix demo

shards: setup
	$(VENV)/bin/rmix shards --dataset $(DATASET) $(if $(SRC),--src $(SRC)) --out $(OUT) $(SHARDS_ARGS)

bench: setup
	$(VENV)/bin/rmix bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) data/ .pytest_cache

# -- detection / segmentation: the OpenMMLab stack on top of `setup` (needed by `test` and the mm-*
# targets, not by `demo`). mmcv 2.1.0 is built from source with its CPU ops the first time (about 20 min
# on 2 cores) and cached as a wheel under ~/.cache/rmix/mmcv/ keyed by mmcv/torch/python; later installs
# take seconds. scripts/build_mmcv.sh says what it does while it builds.
MM_STAMP  := $(VENV)/.setup-mm-stamp
MM_CONFIG ?= atss_r50_fpn_1x_coco
BACKBONE  ?= checkpoints/r50_rm.pth
MM_ARGS   ?=
MM_CKPT   ?=

.PHONY: setup-mm mm-export mm-train mm-test

setup-mm: $(MM_STAMP)

$(MM_STAMP): $(STAMP) scripts/build_mmcv.sh
	@wheel=$$(bash scripts/build_mmcv.sh $(PY)) && \
	  echo "setup-mm: installing $$wheel, mmengine, mmdet, mmsegmentation" && \
	  $(PIP) install -q "setuptools<81" "$$wheel" -e '.[mm]'
	@touch $(MM_STAMP)

# make mm-export CKPT=logs/imagenet/rm/best.pth BACKBONE=checkpoints/r50_rm.pth
mm-export: setup
	$(VENV)/bin/rmix export-backbone $(CKPT) $(BACKBONE)

# make mm-train MM_CONFIG=upernet_r50_8xb2-80k_ade20k-512x512 BACKBONE=checkpoints/r50_rm.pth MM_ARGS='--data-root ...'
mm-train: setup-mm
	$(VENV)/bin/rmix mm train $(MM_CONFIG) --backbone $(BACKBONE) $(MM_ARGS)

# make mm-test MM_CONFIG=atss_r50_fpn_1x_coco MM_CKPT=work_dirs/atss_r50_fpn_1x_coco/epoch_12.pth
mm-test: setup-mm
	$(VENV)/bin/rmix mm test $(MM_CONFIG) $(MM_CKPT) $(MM_ARGS)

# -- the GPU check: verifies and measures the GPU path on one GPU machine in at most 6 minutes, writing
# $(GPU_OUT)/gpu-check.json and gpu-check.md; exit status 1 when a step failed. Independent of `setup`: it runs
# $(GPU_PYTHON) on the repository as it is, with DALI and webdataset from PYTHONPATH. On a bare GPU machine the
# wheels come from ../shared/gpu/bundle.sh, unpacked and installed by the one line it prints:
#   mkdir -p /tmp/w && cat $(ls -d .gpu[0-9]* | sort -V | sed "s|$|/part.*|") | tar -xf - -C /tmp/w && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /tmp/w/*.whl && export PYTHONPATH=/tmp/site:$PWD
# then: make gpu-check GPU_OUT=$OUT (docs/gpu-check.md). On a CPU: make gpu-check GPU_CHECK_ARGS=--dry-run
GPU_PYTHON     ?= python3
GPU_OUT        ?= gpu-check-out
GPU_CHECK_ARGS ?=

.PHONY: gpu-check

gpu-check:
	$(GPU_PYTHON) -m tools.gpu_check --out $(GPU_OUT) $(GPU_CHECK_ARGS)
