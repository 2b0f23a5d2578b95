#!/usr/bin/env bash
# Train AutoSAM's g (stage 1, frozen SAM) and then h (stage 2) on polyp stills or clips.
#   scripts/train_image.sh [CONFIG] [key.sub=value ...] [--out DIR] [--resume] [--stage g|h|all]
# CONFIG defaults to the repository's configs/train/polyp_litemedsam.yaml. Relative paths (CONFIG, --out,
# data.root, cache.dir) are relative to the folder this is run from; --out defaults to runs/<config name> there.
# Several GPUs:
#   NPROC=4 scripts/train_image.sh CONFIG      (runs under torchrun, one process per GPU)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"   # vps from this checkout, without changing folder
if [[ -n "${NPROC:-}" ]]; then
  exec torchrun --nproc_per_node "$NPROC" -m vps.cli.train "$@"
fi
exec python -m vps.cli.train "$@"
