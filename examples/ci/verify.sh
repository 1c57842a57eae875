#!/usr/bin/env bash
# The mmsurgery deployment gate as a plain script, for any CI (GitLab, Jenkins, Buildkite, a cron job).
#
#   examples/ci/verify.sh PAIRED [OUT_DIR]
#
# Folds the trained paired checkpoint PAIRED into OUT_DIR/model.plain.safetensors, exports OUT_DIR/model.onnx (+ .data) and
# verifies both (weights, keys, fold, ONNX Runtime, cost, latency), writing OUT_DIR/verify.json and OUT_DIR/verify.xml.
# Exit code: 0 ship it; 1 a check failed; 2 bad input or usage; anything else an internal error.
# Extra options for `verify` go in MMSURGERY_VERIFY_ARGS, e.g. MMSURGERY_VERIFY_ARGS="--max-latency-ratio 1.10" or
# "--export-cache ~/.cache/mmsurgery-export" (a repeated gate of the same architecture then skips the export).
set -euo pipefail

if [[ $# -lt 1 || $# -gt 2 ]]; then
    echo "usage: $0 PAIRED [OUT_DIR]" >&2
    exit 2
fi
paired=$1
out=${2:-build}
mkdir -p "$out"
plain="$out/model.plain.safetensors"
graph="$out/model.onnx"
rm -f "$graph" "$graph.data"  # an existing .onnx would be taken as is: always verify a fresh export

mmsurgery fold "$paired" -o "$plain" --force

status=0
# shellcheck disable=SC2086  # MMSURGERY_VERIFY_ARGS is split into options on purpose
mmsurgery verify "$plain" --against "$paired" --onnx "$graph" \
    --json "$out/verify.json" --junit "$out/verify.xml" ${MMSURGERY_VERIFY_ARGS:-} || status=$?

case $status in
    0) echo "verify: PASSED, $plain and $graph may ship" ;;
    1) echo "verify: FAILED, a check failed; see the table above and $out/verify.json" >&2 ;;
    2) echo "verify: bad input or usage (see the error above)" >&2 ;;
    *) echo "verify: internal error (exit $status); rerun with 'mmsurgery --debug verify ...'" >&2 ;;
esac
exit "$status"
