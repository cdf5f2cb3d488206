#!/usr/bin/env bash
# Run the same command on every worker of a Cloud TPU VM slice. jax.distributed detects the pod
# from the TPU VM environment, so no coordinator flags are needed.
#
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a launch/tpu_pod.sh \
#       python -m unclip_jax.main --config=experiments/paper/decoder_64.py --workdir=gs://bucket/dec64
#
# Optional: REPO_DIR (checkout path on the workers, default ~/unclip-jax), SETUP=1 installs the
# package with TPU support on every worker first. The workdir must be shared (GCS or NFS).
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
REPO_DIR="${REPO_DIR:-~/unclip-jax}"
CMD="$*"
[ -n "$CMD" ] || { echo "usage: TPU_NAME=.. ZONE=.. $0 COMMAND..." >&2; exit 2; }
if [ "${SETUP:-0}" = "1" ]; then
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all \
    --command "cd $REPO_DIR && pip install -e . 'jax[tpu]'"
fi
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all \
  --command "cd $REPO_DIR && $CMD"
