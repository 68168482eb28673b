PORT ?= 8000
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

test: venv
	$(PY) -m pytest -q tests

run: venv
	PORT=$(PORT) $(PY) -m app.run

clean:
	rm -rf .venv var
