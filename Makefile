# foldtune — every target depends on .venv, so each works on a fresh clone.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
FT     := $(BIN)/foldtune

export NO_ALBUMENTATIONS_UPDATE := 1
export PYTHONUNBUFFERED := 1

DATA    ?= demo/data           # data root (train/ and eval/)
SPACE   ?= auto                # search space: auto = search_spaces/default.yaml with GPUs, else cpu.yaml
TORCH   ?=                     # .venv: cu126|cu128|cu130|cpu = that torch build (PyTorch's index); empty: PyPI's
TRIALS  ?=                     # number of trials (default: the space's)
NAME    ?=                     # search name (default: the space's name)
STORAGE ?= runs                # search results folder (shared storage on a cluster)
RELABEL ?=                     # search: label-fix CSV (id,field,value), kept with the search
FOLD_FILE ?=                   # search: a fold file from `foldtune folds` (default: made from the space)
TIME    ?=                     # search: time budget in minutes (cuts running trials, keeps their best models)
HOLDOUT ?=                     # search: share of persons held out of every fold (default: the space's)
RESUME  ?=                     # search: 1 = continue the search NAME (interrupted, or with a larger TIME)
TRIAL   ?=                     # refit, label-issues, explain: one trial (default: the ensemble's first member)
SEEDS   ?=                     # refit: models per trial (default 1)
WITH_REFIT ?=                  # ensemble: 1 = add the members' refit models to the vote
TOP     ?=                     # ensemble: N best trials instead of greedy selection
TTA     ?=                     # ensemble: TTA views, e.g. hflip,scale (default: the trials' own)
OUT     ?=                     # ensemble: submission path; predict: output CSV (default predictions.csv)
FOLDS   ?=                     # ensemble: only these fold models, e.g. 0 (default: all k)
MODEL   ?=                     # predict: a search name, a model folder or models:/NAME/VERSION (default: the search's)
IMAGES  ?=                     # predict: a folder of images or a CSV with image_path (default: DATA/eval/images)
PORT    ?= 5000                # MLflow UI port
TRACKING_URI ?=                # MLflow store for ui (default: MLFLOW_TRACKING_URI, else mlruns/mlflow.db)
PERSONS ?= 200                 # demo data persons
BENCH_DATA ?=                  # benchmark data root (default: realistic AAF data if present, else demo)

opt = $(if $(strip $(2)),$(1) $(strip $(2)),)

.PHONY: .venv all demo demo-data search ensemble refit label-issues explain predict ui doctor test test-slow \
	test-floors \
	bench bench-outage bench-budget bench-gpu lint format clean

# the space file: SPACE, or for auto the one `foldtune search --space auto` picks on this machine
space_file = $(if $(filter auto,$(strip $(SPACE))),$(shell $(FT) doctor --which-space),$(strip $(SPACE)))
search_name = $(or $(strip $(NAME)),$(shell $(BIN)/python -c "import yaml,sys; print(yaml.safe_load(open('$(space_file)'))['name'])"))
# TORCH=cu126|cu128|cu130|cpu: torch and torchvision from PyTorch's wheel index for that build (at the
# versions constraints.txt pins), before everything else; torch brings its own CUDA runtime packages
torch_index = https://download.pytorch.org/whl/$(strip $(TORCH))

all: test

# free disk the venv needs, in GB: the default torch is a CUDA build (the venv measured 6.8 GB); pip's own
# "No space left on device" comes minutes in and names no size, so this says it first, in one line
venv_gb = $(if $(filter cpu,$(strip $(TORCH))),3,7)

$(VENV)/.installed: pyproject.toml constraints.txt
	@$(PYTHON) -c "import shutil, sys; free = shutil.disk_usage('.').free / 2**30; \
		sys.exit(0 if free >= $(venv_gb) else f'error: .venv needs about $(venv_gb) GB of free disk here and' \
		f' {free:.1f} GB is free: free some space (df -h .), then run make again')"
	$(PYTHON) -m venv $(VENV)
	$(if $(strip $(TORCH)),$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt \
		--index-url $(torch_index) torch torchvision)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev,weights]'
	echo '$(or $(strip $(TORCH)),default)' > $(VENV)/.torch
	touch $@

.venv: $(VENV)/.installed
	@if [ -n "$(strip $(TORCH))" ] && [ "$$(cat $(VENV)/.torch 2>/dev/null)" != "$(strip $(TORCH))" ]; then \
		echo "error: .venv holds the torch build '$$(cat $(VENV)/.torch 2>/dev/null || echo default)', not" \
			"'$(strip $(TORCH))': run make clean, then make .venv TORCH=$(strip $(TORCH))" >&2; exit 2; fi

demo: .venv
	$(BIN)/python -m orchestrator.demo --data $(strip $(DATA)) --persons $(strip $(PERSONS)) --storage $(strip $(STORAGE))

demo-data: .venv
	$(FT) demo-data $(strip $(DATA)) --persons $(strip $(PERSONS))

search: .venv
	$(FT) search --data $(strip $(DATA)) --space $(strip $(SPACE)) --storage $(strip $(STORAGE)) \
		$(call opt,--trials,$(TRIALS)) $(call opt,--name,$(NAME)) $(call opt,--relabel,$(RELABEL)) \
		$(call opt,--folds,$(FOLD_FILE)) $(call opt,--time-budget,$(TIME)) $(call opt,--holdout,$(HOLDOUT)) \
		$(if $(filter 1 yes true,$(strip $(RESUME))),--resume)

ensemble: .venv
	$(FT) ensemble --data $(strip $(DATA)) --storage $(strip $(STORAGE)) \
		--search $(search_name) \
		$(call opt,--top,$(TOP)) $(call opt,--tta,$(TTA)) $(call opt,--out,$(OUT)) \
		$(call opt,--folds,$(FOLDS)) $(if $(strip $(WITH_REFIT)),--with-refit,)

refit: .venv
	$(FT) refit --data $(strip $(DATA)) --storage $(strip $(STORAGE)) --search $(search_name) \
		$(call opt,--trial,$(TRIAL)) $(call opt,--seeds,$(SEEDS))

label-issues: .venv
	$(FT) label-issues --data $(strip $(DATA)) --storage $(strip $(STORAGE)) --search $(search_name) \
		$(call opt,--trial,$(TRIAL)) $(call opt,--out,$(OUT))

explain: .venv
	$(FT) explain --data $(strip $(DATA)) --storage $(strip $(STORAGE)) --search $(search_name) \
		$(call opt,--trial,$(TRIAL)) $(call opt,--out,$(OUT))

predict: .venv
	$(FT) predict --storage $(strip $(STORAGE)) \
		--model $(or $(strip $(MODEL)),$(search_name)) \
		--images $(or $(strip $(IMAGES)),$(strip $(DATA))/eval/images) --out $(or $(strip $(OUT)),predictions.csv) \
		$(call opt,--tta,$(TTA))

ui: .venv
	$(FT) ui --port $(strip $(PORT)) $(call opt,--tracking-uri,$(TRACKING_URI))

doctor: .venv
	$(FT) doctor --storage $(strip $(STORAGE)) $(if $(filter auto,$(strip $(SPACE))),,--space $(strip $(SPACE))) \
		$(call opt,--tracking-uri,$(TRACKING_URI))

test: .venv
	$(BIN)/python -m pytest -q

test-slow: .venv
	$(BIN)/python -m pytest -q -m slow

# the suite on the oldest versions pyproject.toml allows (.ci/floors.py pins each dependency at its floor)
test-floors:
	$(PYTHON) -m venv .venv-floors
	$(PYTHON) .ci/floors.py > .venv-floors/floors.txt
	.venv-floors/bin/pip install --quiet --disable-pip-version-check -r .venv-floors/floors.txt
	.venv-floors/bin/pip install --quiet --disable-pip-version-check --no-deps -e .
	.venv-floors/bin/python -m pytest -q

bench: .venv
	$(BIN)/python -m benchmarks $(call opt,--data,$(BENCH_DATA))

# a search against a real mlflow server that is up, killed or hung mid-search (BENCHMARKS.md)
bench-outage: .venv
	$(BIN)/python -m benchmarks.mlflow_outage $(call opt,--out,$(BENCH_OUT))

# no .venv prerequisite: on a GPU machine with its own python (torch + timm) that cannot install one
bench-budget: .venv  # the planned search vs one model of the same compute, one core each (BENCHMARKS.md)
	$(BIN)/python -m benchmarks.equal_compute --data $(or $(strip $(BENCH_DATA)),/tmp/aafmask) \
		--minutes $(or $(strip $(TIME)),30) --out $(or $(strip $(BENCH_OUT)),/tmp/foldtune-bench-budget) \
		$(call opt,--seed,$(SEED))

bench-gpu:
	$(or $(wildcard $(BIN)/python),$(PYTHON)) -m benchmarks.gpu_device $(call opt,--out,$(BENCH_OUT))

lint: .venv
	$(BIN)/ruff check orchestrator trainers benchmarks tests
	$(BIN)/ruff format --check orchestrator trainers benchmarks tests

format: .venv
	$(BIN)/ruff format orchestrator trainers benchmarks tests
	$(BIN)/ruff check --fix orchestrator trainers benchmarks tests

clean:
	rm -rf $(VENV) .venv-floors runs demo .pytest_cache
