# Two commands on a fresh machine with Python 3.11: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.ldr-tf-installed

.PHONY: install install-ci test test-slow demo bench clean

# tensorflow-serving-api (TF Serving client protos for tools/serving) goes in with --no-deps: its metadata
# requires the full `tensorflow` wheel, which would clash with tensorflow-cpu; it needs only grpcio and
# protobuf, which are already there (pip check reports the missing `tensorflow` requirement: expected).
$(STAMP): setup.py constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt -e '.[test]'
	$(PIP) install -q --no-deps -c constraints.txt tensorflow-serving-api
	@touch $(STAMP)

install: $(STAMP)

# The optional test dependencies (antspyx for the ANTs comparison tests, PyYAML for the compose-file check):
# .ci/run installs them so that no test skips in CI; `make test` alone stays the quick default.
install-ci: $(STAMP)
	$(PIP) install -q -c constraints.txt -e '.[ci]'

# The test files are spread over worker processes (pytest-xdist; -n auto = min(4, CPUs), tests/conftest.py), a
# whole file per worker so that its module fixtures are built once: 6.5 instead of 13.8 min on 2 Zen 3 cores.
# `make test PYTEST_ARGS=` runs them in this one process instead.
PYTEST_ARGS ?= -n auto --dist loadfile

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

demo: $(STAMP)
	$(PY) -m ldr_tf.demo --out_dir=demo_out

bench: $(STAMP)
	$(PY) -m ldr_tf.benchmark --out=bench_out/benchmark.json

clean:
	rm -rf $(VENV) demo_out bench_out build *.egg-info
