# Two commands do everything on a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cksum requirements.txt | cut -d' ' -f1)

.PHONY: venv demo test test-fast clean-demo

venv: $(STAMP)

# torch is installed first and on its own: on CPU-only machines the pinned CPU wheel is taken and no
# CUDA packages are pulled by deepspeed/transformers/accelerate afterwards.
$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==$$(sed -n 's/^torch==//p' requirements.txt)"
	$(PY) -m pip install -q -r requirements.txt
	rm -f $(VENV)/.installed-* && touch $@

demo: venv
	PYTHON=$(PY) bash launch/demo.sh

test: venv
	$(PY) -m pytest tests -q -p no:cacheprovider --durations=25

test-fast: venv
	$(PY) -m pytest tests -q -p no:cacheprovider --durations=25 -m "not slow"

clean-demo:
	rm -rf $${DEMO_DIR:-runs/demo}
