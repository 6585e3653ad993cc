#!/usr/bin/env bash
# Our NBD export vs qemu-nbd under the same fio jobs; see bench/nbd_bench.py for options.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python bench/nbd_bench.py "$@"
