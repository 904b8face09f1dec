#!/bin/sh
# The reproduction as one process and as a 2-rank MPI job at the same global batch: the same
# base model to the byte, and the reports' numbers agree up to float rounding (relative 1e-5;
# here they differ by about 1e-9, the stage losses in their sixth decimal at most).
#
#   same_result.sh <reproduce> <reproduce_mpi> <dir> <mpirun -np 2 ...>
set -eu
one=$1 many=$2 dir=$3
shift 3
rm -rf "$dir"
mkdir -p "$dir"
tiny="--methods sa_proj,lwf --order count,birds --vision-pretrain-steps 2 --vision-pretrain-batch 4
      --pretrain-steps 3 --pretrain-batch 8 --stage-steps 4 --stage-batch 4 --test-examples 4 --seeds 1
      --jobs 1 --quiet --lr 5e-4"
# (--lr: fixed rates. The learning-rate search runs the same stages on every rank, but a near
# tie between two rates could be decided either way by the ranks' float rounding.)
# Each pretrains its own base model: the single process in a child, the job on rank 0 alone.
# shellcheck disable=SC2086
"$one" $tiny --out "$dir/one" >"$dir/one.txt"
# shellcheck disable=SC2086
"$@" "$many" $tiny --out "$dir/two" >"$dir/two.txt"
cmp "$dir/one/base.safetensors" "$dir/two/base.safetensors" ||
  { echo "the job's rank 0 pretrained another base model than the single process"; exit 1; }
# The job divided the decoding of the test sets: rank 0 decoded some of the chunks, not all.
split=$(sed -n 's/^Evaluation divided among 2 ranks: rank 0 decoded \([0-9]*\) of the \([0-9]*\) chunks of the test and validation sets.*/\1 \2/p' "$dir/two/report.md")
set -- $split
[ $# -eq 2 ] && [ "$1" -gt 0 ] && [ "$1" -lt "$2" ] ||
  { echo "the job's report does not say that 2 ranks divided the evaluation ($split)"; exit 1; }
echo "evaluation divided: rank 0 decoded $1 of $2 chunks"
# Every number of the files that hold results (not times or memory): each stage's last
# training loss, the accuracy matrices, the probes (the number-token mass and the KL to the
# base model after steps 1 and 4 and after each stage) and the summary's learning, forgetting
# and counting-bias columns.
numbers() {
  sed -n 's/^Last training loss of each stage: //p' "$1/report.md" | tr ' ' '\n'
  for f in accuracy_sa_proj.csv accuracy_lwf.csv probe.csv; do tr ',' '\n' <"$1/$f"; done
  cut -d, -f3-9 "$1/summary.csv" | tr ',' '\n'
}
numbers "$dir/one" >"$dir/one.numbers"
numbers "$dir/two" >"$dir/two.numbers"
paste "$dir/one.numbers" "$dir/two.numbers" | awk -F'\t' '
  { n++
    if ($1 == $2) next
    x = $1 + 0; y = $2 + 0; d = x - y; if (d < 0) d = -d; m = (x < 0 ? -x : x); if (m < 1e-3) m = 1e-3
    numeric = "^-?[0-9.]+([eE][-+]?[0-9]+)?$"
    if ($1 !~ numeric || $2 !~ numeric || d > 1e-5 * m) { print "differ: " $1 " (1 process) vs " $2 " (2 ranks), line " n; bad = 1 } }
  END { if (n < 50) { print "expected the results of two methods, found " n " values"; exit 1 }
        if (bad) exit 1; print "same result: 1 process and 2 ranks (" n " values)" }'
