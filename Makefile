# edge_sdk — everything a newcomer or CI needs, from a fresh machine.
#   make demo   build a tiny Ministral 3 into an INT4 engine package and serve it over a local mosquitto
#   make test   run the test suite
#   make serve  the device set-up locally: mosquitto with devices/mosquitto's config + the daemon on the demo package
#   make bench-peers [LAYERS=6]  CPU decode vs llama.cpp and ONNX Runtime GenAI on the same weights (slow: builds the peers)
#   make bench-audio             log-mel, the full-size Voxtral audio encoder and end of speech to transcript vs transformers
#   make flash PACKAGE=DIR [DEVICE=user@host]  install SDK + model + daemon on a Jetson; make rollback, make unflash
#   make test-flash  the flash tests against a test device (slow)

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
SYSTEM_PACKAGES := mosquitto mosquitto-clients libmosquitto-dev gcc
DEMO_DIR := engines/demo

.PHONY: demo test test-flash flash rollback unflash serve bench-peers bench-audio system-deps install clean

# Debian packages: the broker the daemon talks to, and libmosquitto for the C firmware example.
system-deps:
	@missing=""; for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

# setup.py compiles the CPU kernels (edge_sdk/runtime/csrc/) into the package at install.
$(VENV)/.installed: pyproject.toml setup.py $(wildcard edge_sdk/runtime/csrc/*)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: system-deps $(VENV)/.installed

$(DEMO_DIR)/checkpoint/config.json: | install
	$(PY) -m edge_sdk.tiny $(DEMO_DIR)/checkpoint

$(DEMO_DIR)/int4-cpu/manifest.json: $(DEMO_DIR)/checkpoint/config.json
	$(VENV)/bin/edge-sdk build $(DEMO_DIR)/checkpoint --quant int4 --device cpu -o $(DEMO_DIR)/int4-cpu

demo: install $(DEMO_DIR)/int4-cpu/manifest.json
	$(PY) examples/demo.py $(DEMO_DIR)/int4-cpu

serve: install $(DEMO_DIR)/int4-cpu/manifest.json
	EDGE_SDK=$(VENV)/bin/edge-sdk devices/serve_local.sh $(DEMO_DIR)/int4-cpu $(or $(PORT),1883)

# TensorRT's public headers for the plugin compile checks, where the development machines keep them.
TRT_HEADERS ?= $(shell ls -d $(CURDIR)/../shared/third_party/tensorrt/*/include 2>/dev/null | tr '\n' ':')

# Speech fixtures for the audio tests are spoken by espeak-ng and resampled by sox; arecord
# (alsa-utils) captures from ALSA's file plugin in the microphone tests.
TEST_PACKAGES := espeak-ng sox alsa-utils

test: install
	@$(MAKE) --no-print-directory system-deps SYSTEM_PACKAGES="$(TEST_PACKAGES)"
	EDGE_SDK_TRT_HEADERS="$(TRT_HEADERS)" $(PY) -m pytest -q -m "not flash"

# `make flash` against a test device (sshd in network + mount namespaces of its own; needs root).
FLASH_TEST_PACKAGES := openssh-server openssh-client rsync iproute2
test-flash: install
	@$(MAKE) --no-print-directory system-deps SYSTEM_PACKAGES="$(FLASH_TEST_PACKAGES)"
	$(PY) -m pytest -q -m flash

# On the device itself: make flash PACKAGE=engines/...   From a workstation: add DEVICE=user@host.
# CHECKPOINT=... builds the package for the device's profile (PROFILE=..., default: what it reports).
FLASH_ARGS = --target $(or $(DEVICE),local) $(if $(PACKAGE),--package $(PACKAGE))$(if $(CHECKPOINT),--checkpoint $(CHECKPOINT)) \
	$(if $(PROFILE),--profile $(PROFILE)) $(if $(DEVICE_ID),--device-id $(DEVICE_ID))
flash: install
	$(VENV)/bin/edge-sdk flash $(FLASH_ARGS)
rollback: install
	$(VENV)/bin/edge-sdk rollback --target $(or $(DEVICE),local)
unflash: install
	$(VENV)/bin/edge-sdk unflash --target $(or $(DEVICE),local)

# The peers live in their own environment (their builds pull other versions of ONNX Runtime and
# friends); llama.cpp is compiled with portable flags (AVX2/FMA/F16C, no -march=native).
PEERS := .venv-peers
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON

$(PEERS)/.installed:
	$(PYTHON) -m venv $(PEERS)
	$(PEERS)/bin/python -m pip install -q --upgrade pip
	$(PEERS)/bin/python -m pip install -q 'numpy<2.4' torch==2.13.0 'transformers>=5,<6' sentencepiece safetensors \
		'mistral-common>=1.8' onnxruntime-genai onnxruntime onnx onnx-ir
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PEERS)/bin/python -m pip install -q llama-cpp-python==0.3.36
	touch $@

bench-audio: install
	$(PY) benchmarks/audio_bench.py

bench-peers: install $(PEERS)/.installed
	$(PY) benchmarks/peer_bench.py --layers $(or $(LAYERS),6) --peers-python $(PEERS)/bin/python

clean:
	rm -rf $(VENV) $(PEERS) $(DEMO_DIR) .pytest_cache
