# The two commands of the README: `make demo` and `make test`. Both build .venv from scratch on a
# fresh machine (Python 3.11, x86-64 Linux) with every pin from constraints.txt. pip byte-compiles at install
# (1.5 minutes): measured, skipping it made the tests slower by more (this environment sets PYTHONDONTWRITEBYTECODE).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
export NM_DISABLE_ANALYTICS := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: venv test demo bench fuzz clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt "setuptools<81" wheel
	$(PY) -m pip install -q -c constraints.txt -e ".[vision,transformers,lightning,deepsparse,sparseml,openvino,diffusion,dev]"
	$(PY) -c "import sift_compiler, torch, torchvision, onnx, onnxruntime, deepsparse, accelerate, lightning; print('venv ready: torch', torch.__version__, 'onnx', onnx.__version__)"
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest -n 2 --dist loadgroup --timeout 900 -q

demo: venv
	$(PY) examples/demo.py

bench: venv
	$(PY) benchmarks/compile_time.py

# Not part of `make test`: 1,000 random models per transform, every check (about 2 hours on 2 cores).
fuzz: venv
	$(PY) tests/fuzz.py --examples 1000 --failures fuzz-failures.json

clean:
	rm -rf $(VENV) build *.egg-info demo-out fuzz-failures.json
