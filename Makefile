# The two commands of the README. Each creates .venv/ first if needed.
.PHONY: run test env lock benchmarks

env:
	@scripts/bootstrap.sh

run: env
	.venv/bin/deepseek-tfx run

test: env
	scripts/run_tests.sh

benchmarks: env
	.venv/bin/python -m benchmarks.run_all --quick --out benchmarks/results/quick.json
