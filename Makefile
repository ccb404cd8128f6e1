# Set-up and everyday commands. Each target installs what it needs on a fresh machine.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.loupe-installed
# Debian packages: the built-in photo pool (opencv-doc, Tux Paint stamps) and a browser for UI tests.
APT_PKGS := opencv-doc tuxpaint-stamps-default chromium

.PHONY: demo test install system-deps loupe-tiny clean

demo: $(STAMP)        ## set up, then run the chat demo on loupe-tiny at http://127.0.0.1:7860
	$(VENV)/bin/loupe demo

test: $(STAMP) system-deps   ## set up, then run the test suite
	$(PY) -m pytest -q

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# CPU-only machine: take the CPU build of torch, not the multi-GB CUDA default.
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PIP) install -q "torch==2.13.0"; fi
	$(PIP) install -q -e '.[demo,dev]'
	touch $@

system-deps:          ## Debian packages (skipped when present or when not root)
	@missing=""; for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "note: missing Debian packages:$$missing (tests that need them will skip)"; fi; fi

loupe-tiny: $(STAMP) system-deps   ## rebuild the default model's data and weights from nothing (about 1 h on 2 cores)
	bash finetune/recipes/build-loupe-tiny.sh

clean:
	rm -rf $(VENV) .pytest_cache
