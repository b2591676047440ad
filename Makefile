# The two commands of the README. Each creates .venv/ first if needed.
.PHONY: run test env lock benchmarks

env:
	@scripts/bootstrap.sh

run: env
	.venv/bin/deepseek-tfx run

# run_tests.sh builds what is missing itself (the TFX venv beside the engine's tests).
test:
	scripts/run_tests.sh

benchmarks: env
	.venv/bin/python -m benchmarks.run_all --quick --out benchmarks/results/cpu_quick.json

# Container images for Kubeflow Pipelines (docker/README.md). Needs Docker with BuildKit.
IMAGE ?= deepseek-tfx
TAG ?= $(shell sed -n 's/^version = "\([^"]*\)".*/\1/p' pyproject.toml)
DOCKER ?= docker

.PHONY: image image-gpu image-beam
image image-gpu image-beam: DOCKER_CHECK = @$(DOCKER) info >/dev/null 2>&1 || { echo "make $@: no usable Docker daemon ($(DOCKER) info failed)" >&2; exit 1; }

image:
	$(DOCKER_CHECK)
	DOCKER_BUILDKIT=1 $(DOCKER) build -f docker/Dockerfile -t $(IMAGE):$(TAG) .

image-gpu:
	$(DOCKER_CHECK)
	DOCKER_BUILDKIT=1 $(DOCKER) build -f docker/Dockerfile.gpu -t $(IMAGE)-gpu:$(TAG) .

image-beam:
	$(DOCKER_CHECK)
	DOCKER_BUILDKIT=1 $(DOCKER) build -f docker/Dockerfile --target beam-worker -t $(IMAGE)-beam:$(TAG) .
