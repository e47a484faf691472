# `make serve`: set up (first time) and serve the default model on http://0.0.0.0:8000
# `make test`:  set up (first time) and run the test suite
.PHONY: setup serve test bench

.venv/.setup-done: pyproject.toml scripts/setup.sh
	./scripts/setup.sh
	touch $@

setup: .venv/.setup-done

serve: setup
	.venv/bin/inferd serve $(ARGS)

test: setup
	.venv/bin/python -m pytest -q $(ARGS)

bench: setup
	.venv/bin/python benchmarks/throughput.py $(ARGS)
