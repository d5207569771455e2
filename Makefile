# Two commands do all the set-up on a fresh machine:
#   make run    virtual environment + install + the main job
#   make test   virtual environment + install + the whole test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.nestvox-installed
# Debian packages: speech synthesis and conversion for tests, PortAudio for the mic client,
# Chromium for the browser-client test.
DEBS := espeak-ng sox libsndfile1 libportaudio2 chromium

.PHONY: run test setup debs clean demo-model

# Reproduce the embedded demo model (agent/assets/demo_model): synthetic speech, training, copy.
# Under an hour on 2 CPU cores (synthesis ~3 min alone, 13 min shared; training 45 min); see README "Training the demo model". DEMO_COPY=0 trains into
# DEMO_RUN without replacing agent/assets/demo_model (score it first, then copy DEMO_RUN/final).
DATA ?= .cache/data/home
DEMO_RUN ?= runs/demo
DEMO_COPY ?= 1
DEMO_NICE ?= 0
# Training mix DEVICE,TIMER,ARITHMETIC,OUT_OF_DOMAIN: arithmetic (98-100% right) gives way to the
# out-of-domain requests and timers, the weakest rows of the model this one starts from.
DEMO_WEIGHTS ?= 0.28,0.20,0.27,0.25
# The demo model is fine-tuned from the previous one (configs/demo.yaml init_from), pinned here.
DEMO_INIT_REV ?= b4791ddcdafdbeec268ff77a5ad652ecb70dd7af

setup: debs $(STAMP)

debs:
	@missing=""; for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  sudo=""; [ "$$(id -u)" = 0 ] || sudo="sudo"; \
	  $$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq $$missing; \
	fi

# torch is pinned to 2.13.0 in pyproject.toml: pip takes the local CPU wheel
# (an unpinned torch would pull a multi-GB CUDA build).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -e '.[dev,ray]'
	touch $@

run: setup
	$(PY) serve.py

test: setup
	$(PY) -m pytest -q

demo-model: setup
	nice -n $(DEMO_NICE) $(PY) -m agent.training.synth --out $(DATA) --split train --n 15000 --seed 0 --cut-share 0.2 --weights $(DEMO_WEIGHTS)
	nice -n $(DEMO_NICE) $(PY) -m agent.training.synth --out $(DATA) --split val   --n 300   --seed 1
	nice -n $(DEMO_NICE) $(PY) -m agent.training.synth --out $(DATA) --split test  --n 800   --seed 2
	nice -n $(DEMO_NICE) $(PY) -m agent.training.synth --out $(DATA)/eot --split test --n 400 --seed 4 --cut-share 0.5
	$(PY) -m agent.training.synth --out $(DATA) --split text
	rm -rf .cache/demo_init && mkdir -p .cache/demo_init
	git archive $(DEMO_INIT_REV) agent/assets/demo_model | tar -x -C .cache/demo_init
	rm -rf $(DEMO_RUN)
	nice -n $(DEMO_NICE) $(PY) -m agent.training.train --config configs/demo.yaml output_dir=$(DEMO_RUN)
	if [ "$(DEMO_COPY)" = 1 ]; then \
	  rm -rf agent/assets/demo_model && cp -r $(DEMO_RUN)/final agent/assets/demo_model && \
	  rm -f agent/assets/demo_model/trainer_state.pt; fi

clean:
	rm -rf $(VENV) .cache .pytest_cache
