# dqt — the two set-up commands of the README:
#   make train   create .venv, install, run the main job (2 ranks, CPU/gloo, embedded digits)
#   make test    create .venv, install with test extras, run the test suite
#   make horovod build Horovod 0.28.1 (CPU/Gloo) into .venv for backend=horovod (optional)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# On CPU-only machines install the CPU build of torch first (the CUDA build is several GB).
# GPU users: `make TORCH_SPEC= train` keeps the torch already in the environment.
TORCH_SPEC ?= torch==2.13.0
# The Triton version the CPU test suite runs its kernels with (through the interpreter).
# GPU users: `make TRITON_SPEC= test` keeps the triton that came with their torch.
TRITON_SPEC ?= triton==3.9.0
NPROC  ?= 2
ARGS   ?=
SCHEME ?= +scheme=ternary_grad

.PHONY: install install-dev train test horovod clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@if [ -n "$(TORCH_SPEC)" ]; then $(PY) -m pip install --quiet "$(TORCH_SPEC)"; fi
	$(PY) -m pip install --quiet -e ".[train]"
	touch $@

# Tests also need the `slurm` extra (Hydra's submitit launcher, for tests/test_slurm.py) and the
# `lightning` extra (tests/test_lightning.py); torch stays the one installed above.
$(VENV)/.installed-dev: $(VENV)/.installed Makefile
	$(PY) -m pip install --quiet -e ".[train,dev,triton,slurm,lightning]" $(TRITON_SPEC) || $(PY) -m pip install --quiet -e ".[train,dev,slurm,lightning]"
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

train: install
	$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) launch/train.py $(SCHEME) $(ARGS)

# Optional: Horovod for backend=horovod and tests/test_horovod.py (a patched source build,
# cached as a wheel; see tools/build_horovod.sh).
horovod: install-dev
	tools/build_horovod.sh $(PY)

test: install-dev
	$(PY) -m pytest -q $(ARGS)

clean:
	rm -rf $(VENV) outputs multirun reports .pytest_cache
