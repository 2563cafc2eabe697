#!/usr/bin/env bash
# Paper-protocol single-process epoch, per forced kernel path, beside
# PyTorch (1 and 2 threads) and, optionally, an older mixnn binary; all in
# one run, interleaved, so the ratios hold on a loaded machine.
#
#   bench/engine_paths.sh DATA_DIR [OLD_MIXNN] > engine.json
#
# Needs target/release/mixnn (cargo build --release -p mixnn) and, for the
# PyTorch rows, python3 with torch (PYTHON=/path/to/python3).
set -euo pipefail
data=${1:?usage: bench/engine_paths.sh DATA_DIR [OLD_MIXNN]}
old=${2:-}
py=${PYTHON:-python3}
here=$(cd "$(dirname "$0")/.." && pwd)
mixnn=$here/target/release/mixnn
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
paths=$("$mixnn" selftest 2>/dev/null | awk '$2 == "ok" {print $1}')
[ -n "$paths" ] || paths="avx2 sse2 scalar"
run() { # name, epochs, command...
    local name=$1 epochs=$2; shift 2
    "$@" --data "$data" --no-fetch --seed 1 --epochs "$epochs" --json "$tmp/$name.json" >/dev/null 2>&1
    printf '"%s": %s' "$name" "$(cat "$tmp/$name.json")"
}
echo "{"
for rep in 1 2 3; do
    echo "\"rep$rep\": {"
    for p in $paths; do
        case $p in
            scalar|sse2) e=1 ;; # about 70x slower: one epoch
            *) e=3 ;;
        esac
        if [ "$rep" = 1 ] || [ "$e" = 3 ]; then
            MIXNN_KERNELS=$p run "$p" "$e" "$mixnn" bench local; echo ","
        fi
    done
    if [ -n "$old" ]; then run old 3 "$old" bench local; echo ","; fi
    printf '"pytorch": %s\n' "$("$py" "$here/bench/pytorch_paper.py" --data "$data" --threads 1,2 --epochs 3)"
    if [ "$rep" = 3 ]; then echo "}"; else echo "},"; fi
done
echo "}"
