# Two-command set-up: `make demo` and `make test` each create .venv, install, and run.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
REDI := $(VENV)/bin/redi
STAMP := $(VENV)/.installed

# Real-data defaults (override on the command line).
IMAGES ?= data/demo-images
DATA ?= data
VAE ?= stabilityai/sd-vae-ft-ema
ENCODER ?= facebook/dinov2-with-registers-base
RESOLUTION ?= 256
PCS ?= 32
FORMAT ?= both
PATCH_TOKENS ?= --no-patch-tokens   # --patch-tokens for REPA / REG (256×768 float16 per image)
# channel: per-channel mean/std measured over the latents (LightningDiT)
LATENT_NORM ?= config
# data/demo, or data/demo-512 for RESOLUTION=512 (trained at batch 4 there: 4× the tokens per image)
DEMO ?= data/demo$(if $(filter-out 256,$(RESOLUTION)),-$(RESOLUTION))
DEMO_BATCH ?= $(if $(filter-out 256,$(RESOLUTION)),4,16)

.PHONY: install test demo encode pca shards train sample bench bench-gpu gpu-wheels clean

install: $(STAMP)

# torch==2.13.0 (CPU) lies on this machine's disk; on a CUDA host pip picks a CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi >/dev/null 2>&1; then \
		$(PY) -m pip install -q torch==2.13.0; fi
	$(PY) -m pip install -q -e '.[dev,remote,eval,reference,wandb]'
	touch $(STAMP)

test: install
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

encode: install
	$(REDI) encode $(IMAGES) --data $(DATA) --vae $(VAE) --with-features --encoder $(ENCODER) --resolution $(RESOLUTION)

pca: install
	$(REDI) pca --data $(DATA)

shards: install
	$(REDI) shards --data $(DATA) --pcs $(PCS) --format $(FORMAT) $(PATCH_TOKENS) --latent-norm $(LATENT_NORM)

RUN ?= runs/sit-b-redi
MODEL ?= SiT-B
METHOD ?= redi
train: install
	$(REDI) train --shards $(DATA) --run $(RUN) --model $(MODEL) --method $(METHOD)

GUIDANCE ?= rg
NUM ?= 64
sample: install
	$(REDI) sample --run $(RUN) --guidance $(GUIDANCE) --num $(NUM)

bench: install
	$(REDI) bench all

# The GPU suite (docs/BENCHMARKS.md): JSON per item in $OUT, else runs/bench-gpu. No `install`: on a bare GPU
# machine (no .venv, no network) it runs on the system python3, which has torch, and installs the
# packages that python3 lacks from .whl/ (see gpu-wheels). GPU_ARGS: e.g. --quick, --only ab, --budget 480.
GPU_ARGS ?=
bench-gpu:
	$(if $(wildcard $(PY)),$(PY),python3) -m redi.benchmarks.gpu $(GPU_ARGS)

# Wheels for that machine's python3 (3.12, x86-64; it has torch, numpy, transformers, huggingface-hub,
# safetensors, typer, rich, pillow, torchdiffeq), fetched here from PyPI: the packages it lacks (torchdiffeq in
# case a later image drops it), at versions tested here.
GPU_WHEELS := diffusers==0.42.1 importlib_metadata==10.2.0 lazy-importer==0.1.0 zarr==3.1.6 numcodecs==0.16.6 \
	donfig==0.8.1.post1 google-crc32c==1.9.0 torchdiffeq==0.2.5
gpu-wheels:
	python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp -d .whl \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 $(GPU_WHEELS)

# The whole chain on the embedded default, offline (minutes on a laptop CPU): a small VAE fitted to the demo images
# (`redi demo-vae`: the tiny-random architecture, so the decoded latents and samples show shapes; the tiny-random VAE
# decodes everything to texture), the tiny-random DINOv2 for the PCs, a tiny SiT
# trained with the short EMA a short run needs (decay 0.995: a half-life of 138 steps; the papers' 0.9999 would still be
# the initial network), its EMA weights sampled with classifier-free guidance on all channels (sharper shapes in the
# PCs) beside its untrained network (unguided: its zero output layer makes guidance a no-op), and FD-PC of both
# (docs/METHOD.md). Why 4,500 steps: docs/BENCHMARKS.md, "What the demo learns" (at 2,000 the samples are blobs
# where the shapes lie; 4,500 keeps a cold `make demo` under 10 minutes on 2 cores).
# The recipe is redi/benchmarks/learn.py's Recipe (`redi bench learn` compares the methods with it).
# RESOLUTION=512 runs REPA's 512 recipe (64×64 latents, 32×32 tokens, DINOv2 at 448).
DEMO_RUN = $(DEMO)/runs/sit-debug-redi
DEMO_STEPS ?= 4500
DEMO_SAMPLE = --sampler ode --steps 50 --num 64
DEMO_GUIDANCE = --guidance cfg --cfg-scale 2.4 --cfg-channels all
# Torch threads of the training and the sampling, which run alone: both cores of a 2-core machine, with libgomp's
# spinning cut to 3,000 turns so that a busy core does not stall them. Training steps/s (SiT-debug, batch 16; idle /
# beside a busy process): one thread 10.1 / 9.1; two 15.6 / 1.5 (the threads spin waiting for each other); two with
# GOMP_SPINCOUNT=3000 14.6 / 7.9. Everything else keeps one thread: the VAE fit's small convolutions on two threads
# fell from 16 steps/s to under 2 beside a busy process, and the encode stage's two worker processes take a core each.
DEMO_THREADS ?= 2
DEMO_TORCH = OMP_NUM_THREADS=$(DEMO_THREADS) GOMP_SPINCOUNT=3000
demo: export OMP_NUM_THREADS = 1
demo: install
	$(REDI) demo-data --out $(DEMO)/images
	$(REDI) demo-vae $(DEMO)/images --out $(DEMO)/vae --resolution $(RESOLUTION)
	$(REDI) encode $(DEMO)/images --data $(DEMO) --vae $(DEMO)/vae --with-features --encoder tiny-random --workers 2 \
		--resolution $(RESOLUTION)
	$(REDI) pca --data $(DEMO)
	$(REDI) shards --data $(DEMO) --pcs 16 --format both --shard-size 32 --patch-tokens
	$(REDI) verify $(DEMO)
	$(DEMO_TORCH) $(REDI) train --shards $(DEMO) --run $(DEMO_RUN) --model SiT-debug --method redi --pca-rank 8 \
		--batch-size $(DEMO_BATCH) --max-steps $(DEMO_STEPS) --lr 3e-3 --ema-decay 0.995 --log-every 500 --save-every 1000 \
		--workers 0
	$(REDI) info $(DEMO)
	$(REDI) info $(DEMO_RUN)
	$(DEMO_TORCH) $(REDI) sample --run $(DEMO_RUN) --weights init $(DEMO_SAMPLE) --out $(DEMO)/samples-untrained
	$(DEMO_TORCH) $(REDI) sample --run $(DEMO_RUN) $(DEMO_SAMPLE) $(DEMO_GUIDANCE) --out $(DEMO)/samples
	$(REDI) preview $(DEMO) --samples $(DEMO)/samples
	$(REDI) eval $(DEMO)/samples --ref $(DEMO) --before $(DEMO)/samples-untrained
	@echo "Pictures: $(DEMO)/preview.png (the rows above); $(DEMO)/samples/grid.png and pcs.png (the 64 samples of the"
	@echo "EMA weights and their generated PCs; samples-untrained/: the untrained network's); $(DEMO)/pca_explained_variance.png"
	@echo "(the PCA's spectrum); $(DEMO)/channel_histograms.png (latents and PCs per channel); $(DEMO_RUN)/curves.png (training)."

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
