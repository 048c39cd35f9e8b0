# The two quick-start commands: `make main` (the main job) and `make test`.
PY ?= python3

.PHONY: install main test bench

install:  ## torch's CPU build first (a parity oracle for tests only), then embedjax with extras
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"

main: install  ## fine-tune all-MiniLM-L6-v2 on STS-B (AnglE + anchor); STS-B dev and SICK trial before and after
	$(PY) scripts/train.py --config configs/stsb_anchored.py --workdir workdirs/stsb_anchored

test: install  ## the whole suite on 8 simulated CPU devices, two workers (the slowest 25 tests listed)
	$(PY) -m pytest -q -n 2 --dist loadfile

bench: install  ## side-by-side benchmarks against the PyTorch peers
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) benchmarks/encode_speed.py
	$(PY) benchmarks/gradcache_memory.py
	$(PY) benchmarks/finetune_vs_st.py
