#!/usr/bin/env bash
# The speed table of README ("Numbers") and docs/performance.md: every row
# a ratio of medians measured in one run of this script, on this machine.
#
#   bench/speed.sh DATA [ROUNDS] > speed.md
#
# DATA is a Fashion-MNIST directory (IDX files). Rows, each on the paper's
# protocol (first 30,000 training images, 10,000 test, batch 64, seed 1):
#
#   mlp-local    `mixnn bench local` (default kernel path and threads)
#                beside PyTorch 2.15 with 1 and 2 threads (bench/pytorch_paper.py)
#   mlp-plain    the paper's plain five-hop cascade on loopback
#                (`demo --no-directory --audit-rate 0`) vs its single process
#   mlp-demo     the demo's defaults (directory, two dummies, audits at 0.02)
#   vgg-local    models/vgg-fmnist.toml: `mixnn bench local` vs PyTorch with
#                the same number of threads (bench/pytorch_model.py)
#   vgg-demo     the VGG model through the demo's defaults vs its single process
#   paths        `bench local --every-path` (MLP, one epoch per path)
#
# Needs target/release/mixnn (cargo build --release -p mixnn) and python3
# with torch (PYTHON=/path/to/python3). ROUNDS (default 3) repeats the MLP
# rows, alternating, and reports medians; the VGG rows run once each
# (2 epochs: the median of 2). Runs take about 15 minutes on 2 cores.
set -euo pipefail
data=${1:?usage: bench/speed.sh DATA [ROUNDS]}
rounds=${2:-3}
py=${PYTHON:-python3}
here=$(cd "$(dirname "$0")/.." && pwd)
mixnn=$here/target/release/mixnn
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
threads=${THREADS:-2}

median() { sort -g | awk '{a[NR]=$1} END {if (NR % 2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }
field() { sed -n "s/.*\"$1\": *\([0-9.eE+-]*\).*/\1/p" | head -n 1; }
demo_row() { # out-prefix, flags...
    local p=$1
    shift
    local out
    out=$("$mixnn" demo "$@" --seed 1 --data "$data" --no-fetch --plot "$tmp/fig.png" 2>&1)
    echo "$out" | grep 'median train s' | sed 's/.*local \([0-9.]*\), cascade \([0-9.]*\).*/\1 \2/' >>"$tmp/$p"
    echo "$out" | grep -q byte-identical || echo "warning: $p: not byte-identical" >&2
}

for r in $(seq "$rounds"); do
    "$mixnn" --threads "$threads" bench local --data "$data" --no-fetch --seed 1 --json "$tmp/mlp.json" >/dev/null 2>&1
    field median_train_s <"$tmp/mlp.json" >>"$tmp/mlp-local"
    "$py" "$here/bench/pytorch_paper.py" --data "$data" --threads 1,2 --epochs 3 >"$tmp/pt.json" 2>/dev/null
    "$py" - "$tmp/pt.json" >>"$tmp/mlp-torch" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
print(" ".join(str(r["median_train_s"]) for r in d["runs"]) if "runs" in d else " ".join(str(v["median_train_s"]) for v in d.values()))
EOF
    demo_row mlp-plain --no-directory --audit-rate 0
    demo_row mlp-demo
done

mlp=$(median <"$tmp/mlp-local")
t1=$(cut -d' ' -f1 <"$tmp/mlp-torch" | median)
t2=$(cut -d' ' -f2 <"$tmp/mlp-torch" | median)
pl=$(cut -d' ' -f1 <"$tmp/mlp-plain" | median)
pc=$(cut -d' ' -f2 <"$tmp/mlp-plain" | median)
dl=$(cut -d' ' -f1 <"$tmp/mlp-demo" | median)
dc=$(cut -d' ' -f2 <"$tmp/mlp-demo" | median)

"$mixnn" --threads "$threads" bench local --model "$here/models/vgg-fmnist.toml" --data "$data" --no-fetch --seed 1 --epochs 2 --json "$tmp/vgg.json" >/dev/null 2>&1
vgg=$(field median_train_s <"$tmp/vgg.json")
"$py" "$here/bench/pytorch_model.py" --model "$here/models/vgg-fmnist.toml" --data "$data" --threads "$threads" --epochs 2 >"$tmp/vgg-pt.json" 2>/dev/null
vt=$(field median_train_s <"$tmp/vgg-pt.json")
demo_row vgg-demo --model "$here/models/vgg-fmnist.toml" --epochs 2 --padding classes
vl=$(cut -d' ' -f1 <"$tmp/vgg-demo" | median)
vc=$(cut -d' ' -f2 <"$tmp/vgg-demo" | median)

"$mixnn" bench local --data "$data" --no-fetch --seed 1 --epochs 1 --every-path --json "$tmp/paths.json" >/dev/null 2>&1

ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", a / b}'; }
echo "| row | MixNN s/epoch | compared with | s/epoch | ratio |"
echo "|---|---:|---|---:|---:|"
echo "| MLP, one process ($threads threads) | $mlp | PyTorch 2 threads | $t2 | $(ratio "$mlp" "$t2") |"
echo "| MLP, one process ($threads threads) | $mlp | PyTorch 1 thread | $t1 | $(ratio "$mlp" "$t1") |"
echo "| MLP, plain five-hop cascade | $pc | its one process | $pl | $(ratio "$pc" "$pl") |"
echo "| MLP, demo defaults (directory, 2 dummies, audits 0.02) | $dc | its one process | $dl | $(ratio "$dc" "$dl") |"
echo "| VGG, one process ($threads threads) | $vgg | PyTorch $threads threads | $vt | $(ratio "$vgg" "$vt") |"
echo "| VGG, demo defaults, \`--padding classes\` | $vc | its one process | $vl | $(ratio "$vc" "$vl") |"
echo
echo "Kernel paths (MLP, one epoch each, \`bench local --every-path\`):"
echo
"$py" - "$tmp/paths.json" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
print("| path | calibration µs | s/epoch | same weights |")
print("|---|---:|---:|---|")
for p in d["paths"]:
    print(f"| {p['path']} | {p['calibration_us']:.1f} | {p['median_train_s']:.3f} | {p['same_weights']} |")
EOF
echo
echo "($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores; $rounds rounds of the MLP rows, medians; $(date -u +%F))"
