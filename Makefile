# The two commands of the README: `make demo` and `make test`. Both build .venv from scratch on a
# fresh machine (Python 3.11, x86-64 Linux) with every pin from constraints.txt. The packages are
# installed by uv (pinned in constraints.txt, itself installed by pip) with the indexes pip is
# configured with, byte-compiled in parallel: 1 minute where pip took 3 (measured on 2 cores). If uv
# cannot be installed, pip does it all.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
EXTRAS := vision,transformers,lightning,deepsparse,sparseml,openvino,diffusion,dev
# pip's own index settings (pip.conf or PIP_* variables), read with the system pip, handed to uv, which does not read them
PIP_INDEXES := $(foreach url,$(shell $(PYTHON) -m pip config get global.extra-index-url 2>/dev/null),--extra-index-url $(url)) \
	$(foreach dir,$(or $(PIP_FIND_LINKS),$(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null)),--find-links $(dir))
export NM_DISABLE_ANALYTICS := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: venv test demo bench fuzz clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	if $(PY) -m pip install -q -c constraints.txt uv; then \
		$(VENV)/bin/uv pip install -q --python $(PY) -c constraints.txt --index-strategy unsafe-best-match \
			$(PIP_INDEXES) --compile-bytecode "setuptools<81" wheel -e ".[$(EXTRAS)]"; \
	else \
		$(PY) -m pip install -q -c constraints.txt "setuptools<81" wheel && \
		$(PY) -m pip install -q -c constraints.txt -e ".[$(EXTRAS)]"; \
	fi
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
