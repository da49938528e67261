# videogen: `make demo` runs the server on the embedded tiny model end to end; `make test` runs the tests.
# Both set up .venv first. On a GPU host use the CUDA build of torch: `make TORCH=torch ...`.
# Elsewhere without a GPU, take torch's CPU build from its own index (PyPI's Linux torch is the CUDA
# build, several GB): `make TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu" ...`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch 2.13.0 resolves to the CPU build this project's CI machines have on disk (their pip's
# find-links); from PyPI alone it is the CUDA build.
TORCH  ?= torch==2.13.0
TORCH_PIP_ARGS ?=
SOURCES := pyproject.toml setup.py $(shell find proto server client -name '*.proto' -o -name '*.py' -o -name '*.png' 2>/dev/null)

# The Triton compatibility tests' external client lives in its own environment: tritonclient pins
# protobuf<7, the server's grpc tooling needs protobuf>=7.
TRITON_VENV  ?= .venv-triton
TRITONCLIENT ?= tritonclient[grpc]==2.73.0

.PHONY: demo test venv triton-venv test-tools api-baseline bench-cpu image-smoke clean

venv: $(BIN)/.installed

$(BIN)/.installed: $(SOURCES)
	@$(PYTHON) -c 'import sys; v = sys.version_info; sys.exit(0 if v >= (3, 11) else f"the server needs Python 3.11+ (diffusers 0.42); $(PYTHON) is {v.major}.{v.minor}: make PYTHON=python3.11 ...")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_PIP_ARGS) "$(TORCH)"
	$(BIN)/python -m pip install -q ".[server,test]"
	touch $@

triton-venv: $(TRITON_VENV)/.installed

$(TRITON_VENV)/.installed:
	test -x $(TRITON_VENV)/bin/python || $(PYTHON) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/python -m pip install -q --upgrade pip
	$(TRITON_VENV)/bin/python -m pip install -q "$(TRITONCLIENT)" numpy
	touch $@

demo: venv
	VENV=$(VENV) bash scripts/demo.sh

# Debian programs some tests use (Chromium, Firefox and libavcodec, Prometheus and promtool): installed where
# apt-get can (as root, as on CI); elsewhere those tests skip, saying so. See scripts/test-tools.sh.
test-tools:
	@bash scripts/test-tools.sh

test: venv triton-venv test-tools
	VIDEOGEN_TRITON_PYTHON=$(abspath $(TRITON_VENV))/bin/python $(BIN)/python -m pytest -q --durations=20

# At a release: the API that buf breaking (tests/unit/test_proto_api.py) holds later changes to. Pretty-printed
# so that a refresh reads as a diff.
api-baseline: venv
	$(BIN)/buf breaking --against proto/api-baseline.json
	$(BIN)/buf build --exclude-source-info -o proto/api-baseline.json
	$(BIN)/python -c 'import json, sys; p = sys.argv[1]; d = json.load(open(p)); open(p, "w").write(json.dumps(d, indent=1) + "\n")' proto/api-baseline.json

# Builds deploy/docker/Dockerfile and runs the image as the Kubernetes Deployment does, on the tiny model
# (docker or podman; no GPU needed; ~6 GB of image). See scripts/image-smoke.sh for its settings.
image-smoke:
	bash scripts/image-smoke.sh

bench-cpu: venv
	OMP_NUM_THREADS=1 $(BIN)/python bench/bench.py --tiny --out bench-out

clean:
	rm -rf $(VENV) $(TRITON_VENV) build demo-out bench-out generated.mp4 *.egg-info
