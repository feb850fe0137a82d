# Two commands on a fresh machine:  `make repro` (smoke reproduction)  and  `make test` (all tests).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
SCALE ?= smoke
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export MPLBACKEND := Agg
export PYTHONHASHSEED := 0

.PHONY: setup repro test test-sync test-nbs test-repro test-py clean

$(VENV)/.installed: pyproject.toml constraints.txt
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# constraints.txt pins the tested torch / torchvision; pyproject.toml declares only the oldest versions that work
	$(PY) -m pip install -q -e '.[dev]' -c constraints.txt
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	@# Fashion-MNIST comes from Debian's package where apt is available (optional: without it only that dataset errors).
	@if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && [ ! -d /usr/share/datasets/fashion-mnist ]; then \
	  (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null)) \
	  || echo "warning: could not install dataset-fashion-mnist; Fashion-MNIST features will say how to install it"; fi
	touch $@

setup: $(VENV)/.installed

## The smoke reproduction on the embedded `shapes` dataset (SCALE=cpu for the committed CPU-scale results).
repro: setup
	$(PY) -m vtp_nbdev.repro --scale $(SCALE)

## Everything CI runs: nbdev sync check, every library notebook, the smoke reproduction (papermill driver), the
## documentation site (its links are checked by pytest), pytest.
test: setup test-sync test-nbs test-repro docs test-py

test-sync: setup
	@before=$$(git status --porcelain -- vtp_nbdev nbs; git diff -- vtp_nbdev nbs | sha1sum); \
	$(VENV)/bin/nbdev-export && $(VENV)/bin/nbdev-clean; \
	after=$$(git status --porcelain -- vtp_nbdev nbs; git diff -- vtp_nbdev nbs | sha1sum); \
	if [ "$$before" != "$$after" ] || { [ "$${CI:-}" = true ] && [ -n "$$(git status --porcelain -- vtp_nbdev nbs)" ]; }; then \
	  echo "FAIL: nbdev-export/nbdev-clean changed vtp_nbdev/ or nbs/: the package is out of sync with the notebooks"; \
	  git status --porcelain -- vtp_nbdev nbs; exit 1; fi; echo "nbdev sync: ok"

test-nbs: setup
	@# the notebooks' temporary folders (checkpoints of their demo runs) live in one folder, removed afterwards
	@expected=$$(find nbs -name '*.ipynb' -not -path '*/.ipynb_checkpoints/*' -not -path 'nbs/repro/*' -not -name '_*' | wc -l); \
	scratch=$$(mktemp -d); \
	TMPDIR=$$scratch $(VENV)/bin/nbdev-test --do-print --timing --n-workers 1 --skip-folder-re '^([_.]|repro$$)' 2>&1 \
	  | tee /tmp/vtp_nbdev_test.log; rc=$${PIPESTATUS[0]}; rm -rf "$$scratch"; \
	ran=$$(grep -c '^- Completed' /tmp/vtp_nbdev_test.log); \
	echo "nbdev-test: $$ran of $$expected notebooks ran (rc=$$rc)"; \
	[ "$$rc" = 0 ] && [ "$$ran" -ge "$$expected" ] && [ "$$expected" -gt 0 ]

## The reproduction notebooks run by their driver (papermill) at the smoke scale, as `make repro` does.
test-repro: setup
	$(PY) -m vtp_nbdev.repro --scale smoke --force

test-py: setup
	$(VENV)/bin/pytest -q tests; rc=$$?; if [ $$rc = 5 ]; then echo "FAIL: pytest collected no tests"; exit 1; fi; exit $$rc

## Executed copies of the notebooks in rendered/: library ones as they are, reproduction ones at the cpu scale from the
## results store only (ONLY=names or globs renders a subset).
.PHONY: render docs
render: setup
	$(PY) -c 'from vtp_nbdev.repro import render_main; render_main()' $(if $(ONLY),--only '$(ONLY)')

## The documentation site in site/ (README, rendered notebooks, API per module); installs the `docs` extra if missing.
docs: setup
	@$(PY) -c 'import mkdocs, mkdocs_jupyter, mkdocstrings_handlers.python' 2>/dev/null || \
	  $(PY) -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['docs']))" \
	  | xargs $(PY) -m pip install -q
	$(PY) docs/build_site.py

clean:
	rm -rf runs _proc
