# The two commands of the README:  make reproduce  and  make test.
PY ?= python3
VENV ?= .venv
PYTHON := $(VENV)/bin/python
RESULTS ?= results
# every experiment's --quick run on its embedded offline data, in this order
EXPERIMENTS := illustration_1d rotation label_noise_mwn cross_domain_fewshot metaxl
# --resume: a second make reproduce finishes interrupted runs and keeps finished ones;
# RUN_FLAGS=--overwrite reruns everything (docs/runs_and_resume.md)
RUN_FLAGS ?= --resume

.PHONY: setup test reproduce docs bench gpu-bench clean

$(VENV)/.installed: requirements.txt
	test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PYTHON) -m pip install -q --disable-pip-version-check -r requirements.txt
	touch $@

setup: $(VENV)/.installed

test: setup
	EVOGRAD_NO_PROGRESS=1 $(PYTHON) -m pytest

reproduce: setup
	set -e; for exp in $(EXPERIMENTS); do \
	  echo "== $$exp: python -m $$exp.train --quick --out $(RESULTS)/$$exp $(RUN_FLAGS)"; \
	  $(PYTHON) -m $$exp.train --quick --out $(RESULTS)/$$exp $(RUN_FLAGS); \
	done
	$(PYTHON) -m common.hypergrad_study --quick --out $(RESULTS)/hypergrad_study $(RUN_FLAGS)
	$(PYTHON) -m common.report $(RESULTS)

# refill every generated table and headline figure of the docs from the committed runs/
docs: setup
	$(PYTHON) -m common.report --docs

bench: setup
	$(PYTHON) -m common.bench --out $(RESULTS)/bench.json

clean:   # runs/ (the committed results) is kept
	rm -rf $(RESULTS)

# One CUDA GPU: every paper-shape benchmark, methods side by side (common/gpu_bench.py); writes
# $(RESULTS)/gpu_bench/gpu_bench.json and gpu_bench.md. GPU_BENCH_ARGS="--budget-s 300" for less time.
GPU_BENCH_ARGS ?= --budget-s 480
# With two or more CUDA devices it then adds the sharded (FSDP2) rows: MWN's ResNet-32 widths 4 and 8,
# then MetaXL's XLM-R at widths 256, 384 and 512, each method replicated and sharded over 2 processes
# (nccl), into $(RESULTS)/gpu_bench/fsdp.json and fsdp_metaxl.json.
FSDP_BENCH_ARGS ?= label_noise_mwn --config 8 9 --methods baseline mwn_evograd finite_difference sama mwn_second_order
FSDP_METAXL_BENCH_ARGS ?= metaxl --config 3 4 5 --methods joint_training metaxl metaxl_finite_difference metaxl_sama \
	metaxl_evograd
gpu-bench: setup
	$(PYTHON) -m common.gpu_bench --device cuda $(GPU_BENCH_ARGS) --out $(RESULTS)/gpu_bench
	@if [ "$$($(PYTHON) -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then \
	  $(PYTHON) -m common.bench $(FSDP_BENCH_ARGS) --device cuda --nproc 2 --fsdp --out $(RESULTS)/gpu_bench/fsdp.json; \
	  $(PYTHON) -m common.bench $(FSDP_METAXL_BENCH_ARGS) --device cuda --nproc 2 --fsdp \
	    --out $(RESULTS)/gpu_bench/fsdp_metaxl.json; \
	else echo "FSDP rows skipped: they need 2 or more CUDA devices, this machine has fewer"; fi
