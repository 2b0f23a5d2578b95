#!/usr/bin/env bash
# Train AutoSAM's g (stage 1, frozen SAM) and then h (stage 2) on polyp stills or clips.
#   scripts/train_image.sh [CONFIG] [key.sub=value ...] [--out DIR] [--resume] [--stage g|h|all]
# CONFIG defaults to configs/train/polyp_litemedsam.yaml. Several GPUs:
#   NPROC=4 scripts/train_image.sh CONFIG      (runs under torchrun, one process per GPU)
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -n "${NPROC:-}" ]]; then
  exec torchrun --nproc_per_node "$NPROC" -m vps.cli.train "$@"
fi
exec python -m vps.cli.train "$@"
