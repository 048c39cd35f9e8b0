# The two quick-start commands: `make main` (the main job) and `make test`.
PY ?= python3

.PHONY: install main test bench oracles

install:  ## torch's CPU build first (a parity oracle for tests only), then embedjax with extras
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	$(MAKE) oracles

# PyLate (the ColBERT parity oracle) pins sentence-transformers 5.3 and transformers 5.3, older than
# the test extra's: it lives in its own virtualenv over this one's packages (torch, numpy, ...),
# which tests/pylate_oracle.py runs in (tests/conftest.py: PYLATE_PYTHON).
PYLATE_VENV ?= .venv-pylate
oracles:  ## the PyLate oracle's virtualenv (a minute, once)
	test -x $(PYLATE_VENV)/bin/python || $(PY) -m venv --system-site-packages $(PYLATE_VENV)
	$(PYLATE_VENV)/bin/python -m pip install -q --no-deps pylate==1.6.0 sentence-transformers==5.3.0 \
		transformers==5.3.0 "huggingface-hub>=1.3,<2" "tokenizers>=0.22,<=0.23.0" "kernels>=0.10.2,<0.11" \
		ujson httpx httpcore h11

main: install  ## fine-tune all-MiniLM-L6-v2 on STS-B (AnglE + anchor); STS-B dev and SICK trial before and after
	$(PY) scripts/train.py --config configs/stsb_anchored.py --workdir workdirs/stsb_anchored

test: install  ## the whole suite on 8 simulated CPU devices, two workers (the slowest 25 tests listed)
	$(PY) -m pytest -q -n 2 --dist loadfile

bench: install  ## side-by-side benchmarks against the PyTorch peers
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) benchmarks/encode_speed.py
	$(PY) benchmarks/gradcache_memory.py
	$(PY) benchmarks/finetune_vs_st.py
