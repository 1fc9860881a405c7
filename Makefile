# The two commands a newcomer needs: `make demo` and `make test`. Each creates .venv itself.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
# torch is pinned for development and CI (a CPU wheel); the package itself accepts a range.
TORCH_PIN := torch==2.13.0

.PHONY: demo test gpu-check lint bench lab pretrain figures tables book serve-book clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(STAMP): $(PY) pyproject.toml
	$(PIP) install --quiet $(TORCH_PIN)
	$(PIP) install --quiet -e '.[dev,notebooks,docs]'
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/lowrank-ref compare --out runs/compare

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) scripts/gpu_check.py --dry
	$(PY) -m pytest -q -p no:cacheprovider

# On a lent GPU machine (its own Python with torch/CuPy/PEFT; nothing installed, no venv):
# `make gpu-check PYTHON=python3` or just `python3 scripts/gpu_check.py`; one report, under 8 minutes.
gpu-check:
	$(PYTHON) scripts/gpu_check.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PIP) install --quiet -e '.[bench]'
	@# unset only here (never in tests/CI): they pin an older OpenBLAS kernel that slows a current NumPy
	env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE $(PY) -m bench.run --out bench/results
	env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE MPLBACKEND=Agg $(PY) -m bench.scaling --out bench/results
	$(PY) -m bench.run --readme --out bench/results

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks/ $$([ "$$(id -u)" = 0 ] && echo --allow-root)  # Jupyter refuses root without it

# The book: chapters, notebooks (as committed, never executed here) and the package source, as a
# static site in site/ (built in a temporary folder, then swapped in), then checked in headless
# Chromium when it is installed (exit 2: not installed, said why, the site is still built).
book: $(STAMP)
	$(PY) book/build.py
	@$(PY) book/check.py || [ $$? -eq 2 ]

serve-book: book
	@echo "the book: http://127.0.0.1:8000/index.html (Ctrl-C stops it)"
	$(PY) -m http.server 8000 --bind 127.0.0.1 --directory site

figures: $(STAMP)  # chapters/figures/*.png and the data each is drawn from
	MPLBACKEND=Agg $(PY) -m lowrank_ref.experiments.figures

.PHONY: classroom
classroom: $(STAMP)  # every chapter notebook in LOWRANK_REF_MODE=classroom: times and conclusions -> chapters/data/classroom.json
	MPLBACKEND=Agg $(PY) -m lowrank_ref.experiments.classroom

tables: $(STAMP)  # README's and the chapters' measured tables, from chapters/data/*.json
	$(PY) -m lowrank_ref.experiments.doc_tables --write

pretrain: $(STAMP)
	$(VENV)/bin/lowrank-ref pretrain

clean:
	rm -rf $(VENV) runs site .pytest_cache .hypothesis
