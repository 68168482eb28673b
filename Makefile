PORT ?= 8000
# BASE=smollm2 serves SmolLM2-135M-Instruct (scripts/smollm2.sh); empty: BASE_MODEL or `default`
BASE ?=
PY := .venv/bin/python
PIP := .venv/bin/pip

.PHONY: venv console test run bench-quick clean

# Install torch's CPU wheel first so that the project's torch range installs nothing more.
.venv/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	touch $@

# The console's charting library (uPlot), from the committed lock file; without npm the console
# still runs, its charts replaced by a note.
CONSOLE_DEPS := app/console/node_modules/.package-lock.json
$(CONSOLE_DEPS): app/console/package.json app/console/package-lock.json
	@if command -v npm >/dev/null 2>&1; then cd app/console && npm ci --no-audit --no-fund --loglevel=error; \
	else echo "npm not found: the web console will run without charts (install Node.js and npm)" >&2; fi

console: $(CONSOLE_DEPS)

venv: .venv/.installed console

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
	rm -rf .venv var app/console/node_modules
