#!/bin/sh
# The fine-tuning example as one process and as a 2-rank MPI job at the same global batch:
# both must end at the same evaluation losses (recipe and LoRA), up to float rounding.
#
#   same_result.sh <finetune> <finetune_mpi> <dir with model/ and tokens.txt> <mpirun -np 2 ...>
set -eu
one=$1 many=$2 dir=$3
shift 3
"$one" "$dir/model" "$dir/tokens.txt" "$dir/out-one" sa_proj 20 >"$dir/one.txt"
"$@" "$many" "$dir/model" "$dir/tokens.txt" "$dir/out-two" sa_proj 20 >"$dir/two.txt"
# The number after "->" on the "evaluation loss:" and "LoRA evaluation loss:" lines.
losses() { sed -n 's/^\(.*evaluation loss\): .* -> \([0-9.]*\)$/\1 \2/p' "$1"; }
losses "$dir/one.txt" >"$dir/one.losses"
losses "$dir/two.txt" >"$dir/two.losses"
cat "$dir/one.losses" "$dir/two.losses"
paste "$dir/one.losses" "$dir/two.losses" | awk -F'\t' '
  { split($1, a, " "); split($2, b, " "); n++
    x = a[length(a)] + 0; y = b[length(b)] + 0; d = x - y; if (d < 0) d = -d
    if (d > 1e-4 * (x > 1 ? x : 1)) { print "differ: " $1 " (1 process) vs " $2 " (2 ranks)"; bad = 1 } }
  END { if (n != 2) { print "expected 2 loss lines from each run, found " n; exit 1 }
        if (bad) exit 1; print "same result: 1 process and 2 ranks" }'
