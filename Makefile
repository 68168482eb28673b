PORT ?= 8000
# BASE=smollm2 serves SmolLM2-135M-Instruct (scripts/smollm2.sh); empty: BASE_MODEL or `default`
BASE ?=
PY := .venv/bin/python
PIP := .venv/bin/pip

.PHONY: venv test run bench-quick clean

# Install torch's CPU wheel first so that the project's torch range installs nothing more.
.venv/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	touch $@

venv: .venv/.installed

# lint first (seconds), then the suite
test: venv
	$(PY) -m ruff check .
	$(PY) -m pytest -q tests

run: venv
ifeq ($(BASE),smollm2)
	PORT=$(PORT) PY=$(PY) scripts/smollm2.sh
else ifneq ($(BASE),)
	@echo "unknown BASE=$(BASE): use BASE=smollm2, or BASE_MODEL=/path/to/dir-or.gguf" >&2; exit 2
else
	PORT=$(PORT) $(PY) -m app.run
endif

clean:
	rm -rf .venv var
