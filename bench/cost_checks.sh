#!/bin/bash
# demo epoch before/after issue 26, default demo and --audit-rate 0, alternating rounds
data=${1:?usage: bench/cost_checks.sh DATA  (needs /tmp/mixnn-pre26 and /tmp/mixnn-rel: release builds of the two commits)}
for r in 1 2 3; do
  for b in pre26 rel; do
    for a in default zero; do
      if [ $a = zero ]; then extra="--audit-rate 0"; else extra=""; fi
      out=$(/tmp/mixnn-$b demo --seed 1 --data $data --no-fetch --plot /tmp/fig-$b.png $extra 2>&1)
      line=$(echo "$out" | grep 'median train s')
      ident=$(echo "$out" | grep -c byte-identical)
      audits=$(echo "$out" | grep -io "[0-9]* audits[^.;]*" | head -1)
      echo "$r $b $a | $line | identical=$ident | $audits"
    done
  done
done
