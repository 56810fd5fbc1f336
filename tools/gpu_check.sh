#!/usr/bin/env bash
# The GPU validation, for a lent GPU machine (no network): installs this project without its
# dependencies into a scratch folder, plus any wheels carried in .whl/ (e.g. pulp; see below), then
# runs tools/gpu_check.py. Sized to finish in under 8 minutes on one H200: a Mixtral-8x7B-shaped
# target with 4 of its 32 layers, a full Mistral-7B-shaped draft, GPU memory capped at 24 GB,
# 256 prompts of 128 tokens -> 32. Every line it prints says "timing mode" (random weights).
#
#   bash tools/gpu_check.sh [--out DIR] [extra tools/gpu_check.py flags]
#   bash tools/gpu_check.sh --tiny --device cpu --out /tmp/gc      # smoke run on a CPU
#
# Carry what the GPU machine lacks as wheels (here, before the run):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl pulp pyyaml      (pure-Python wheels: no platform needed)
set -euo pipefail
cd "$(dirname "$0")/.."
site="${TMPDIR:-/tmp}/specoffload-site"
rm -rf "$site" && mkdir -p "$site"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target "$site" .
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
out="bench/results/gpu_check"
if [ -n "${OUT:-}" ]; then out="$OUT/gpu_check"; fi
exec python3 tools/gpu_check.py --out "$out" "$@"
