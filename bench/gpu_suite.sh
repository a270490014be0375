#!/usr/bin/env bash
# Everything a lent GPU session needs, in one device call under DEADLINE_S (default 540 s).
#   bash bench/gpu_suite.sh            # on the GPU machine; $OUT gets suite.tar.gz + summary.txt
#   DRY_RUN=1 DEADLINE_S=6 OUT=/tmp/o bash bench/gpu_suite.sh   # on CPU: fake steps, same bookkeeping
# Steps, limits and the archive/summary logic live in bench/suite_report.py (see docs/gpu_suite.md).
set -u
export PYTHONUNBUFFERED=1
exec "${PY:-python3}" "$(dirname "$0")/suite_report.py" --out "${OUT:-gpu_out}" --work "${WORK:-/tmp/gpu_suite}" "$@"
