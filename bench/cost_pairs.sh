#!/bin/bash
# Cost of a change, measured as alternating runs of two binaries of
# `mixnn` (the machine otherwise idle): the median cascade train seconds
# per epoch of each run (paper protocol, `--seed 1`), one line per run.
#
#   bench/cost_pairs.sh ROUNDS DATA before=BIN after=BIN
#
# Rows: the demo (directory, two dummies, audits at 0.02), the plain
# five-hop cascade (`--no-directory --audit-rate 0`), commitments only
# (`--audit-rate 0.000001`) and audits at 0.02 without the directory.
# Take the median of each label and row; every line also says whether
# the run ended byte-identical to the local trainer.
set -u
rounds=$1 data=$2
shift 2
row() { # label binary name flags...
  local l=$1 b=$2 name=$3
  shift 3
  local out c a id
  out=$("$b" demo "$@" --seed 1 --data "$data" --plot "/tmp/cost-pairs-$l.png" 2>&1)
  c=$(echo "$out" | grep 'median train s' | sed 's/.*cascade \([0-9.]*\).*/\1/')
  a=$(echo "$out" | grep '^audits:' | awk '{print $2}')
  id=$(echo "$out" | grep -c byte-identical)
  echo "$name $l round $r cascade_s ${c:-?} audits ${a:-0} identical $id"
}
for r in $(seq "$rounds"); do
  for lb in "$@"; do
    l=${lb%%=*} b=${lb#*=}
    row "$l" "$b" demo
    row "$l" "$b" plain --no-directory --audit-rate 0
    row "$l" "$b" commitments --no-directory --audit-rate 0.000001
    row "$l" "$b" audits --no-directory --audit-rate 0.02
  done
done
