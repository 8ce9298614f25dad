# Everything runs in .venv, created on first use. CPU torch is pinned first so that the
# `torch>=2.1` requirement never pulls a multi-GB CUDA build on a machine without a GPU.
PYTHON ?= python3
TORCH_PIN ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test demo bench bench-mining bench-train bench-eval bench-quality bench-config bench-scale clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_PIN)"
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $@

test: install
	$(BIN)/python -m pytest -q tests

demo: install
	$(BIN)/python -m hfemb.demo

bench-mining: install
	$(BIN)/python bench/bench_mining.py

bench-train: install
	$(BIN)/python bench/bench_train.py

bench-eval: install
	$(BIN)/python bench/bench_eval.py

bench-quality: install
	$(BIN)/python bench/bench_quality.py

bench-config: install   # slow (~1 h): the held-out check's commands vs the ST peer, 2 seeds; MPNET=$$(../shared/tools/get_mpnet.sh)
	$(BIN)/python bench/bench_config_vs_peer.py --mpnet "$(MPNET)" --seeds 42 7 --parallel 2 --ablate no-redraw=data.redraw_negatives=false \
	    --hybrid-ablate uniform=data.redraw_sampling=uniform

bench-scale: install   # slow: 1M-document mining (~20 min), GradCache memory vs batch
	$(BIN)/python bench/bench_mining_scale.py
	$(BIN)/python bench/bench_grad_cache.py

bench: bench-mining bench-train bench-eval

clean:
	rm -rf $(VENV) demo_output .pytest_cache
