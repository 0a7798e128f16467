#!/usr/bin/env bash
# Preprocess on many machines: a Slurm job array tokenizes the inputs, a dependent job merges them.
#
#   bash slurm/preprocess.sh --array-tasks N [--sbatch OPTION]... TOOL-ARGS...
#
# e.g.  bash slurm/preprocess.sh --array-tasks 16 --sbatch --time=4:00:00 --sbatch --cpus-per-task=16 \
#           --input 'c4/en/c4-train.*.json.gz' --output-prefix data/c4/c4_train --tokenizer tokenizer.model
#
# TOOL-ARGS are tools/preprocess_c4.py's.  First the tool checks them here (--dry-run: inputs,
# output prefix, tokenizer), so a typo fails now rather than in N queued jobs.  Then:
#   - array task I of N (slurm/preprocess.sbatch slice) tokenizes inputs I, I+N, I+2N, ... into
#     PREFIX.shards/ (--shard-slice I/N);
#   - the merge job (slurm/preprocess.sbatch merge), which starts only once every task has
#     succeeded (--dependency=afterok), writes PREFIX.bin/.idx and PREFIX.json (--merge-only): the
#     same bytes as one `python tools/preprocess_c4.py TOOL-ARGS` would write.
# If a task fails, Slurm cancels the merge job (--kill-on-invalid-dep); run the same command again:
# finished shards are kept and reused.  Each --sbatch OPTION goes to both sbatch calls (the merge
# job always gets one CPU).  Logs: slurm-megamix-preprocess-ARRAYID_TASK.out and
# slurm-megamix-preprocess-merge-JOBID.out in the current directory.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; }
fail() { echo "preprocess.sh: $*" >&2; exit 2; }

tasks="" sbatch_opts=() tool_args=()
while (($#)); do
    case $1 in
        --array-tasks) (($# >= 2)) || fail "--array-tasks needs a value"; tasks=$2; shift 2 ;;
        --array-tasks=*) tasks=${1#*=}; shift ;;
        --sbatch) (($# >= 2)) || fail "--sbatch needs a value"; sbatch_opts+=("$2"); shift 2 ;;
        --sbatch=*) sbatch_opts+=("${1#*=}"); shift ;;
        -h | --help) usage; exit 0 ;;
        *) tool_args+=("$1"); shift ;;
    esac
done
[[ $tasks =~ ^[1-9][0-9]*$ ]] || fail "--array-tasks N (a positive integer) is required; got '${tasks}'"
((${#tool_args[@]})) || fail "no arguments for tools/preprocess_c4.py (--input, --output-prefix, --tokenizer)"

python "$here/../tools/preprocess_c4.py" "${tool_args[@]}" --shard-slice "0/$tasks" --dry-run

array=$(sbatch --parsable --array="0-$((tasks - 1))" --output=slurm-%x-%A_%a.out "${sbatch_opts[@]}" \
    "$here/preprocess.sbatch" slice "$tasks" "${tool_args[@]}")
array=${array%%;*}
merge=$(sbatch --parsable --dependency="afterok:$array" --kill-on-invalid-dep=yes \
    --job-name=megamix-preprocess-merge --output=slurm-%x-%j.out "${sbatch_opts[@]}" --cpus-per-task=1 \
    "$here/preprocess.sbatch" merge "${tool_args[@]}")
merge=${merge%%;*}
echo "preprocess.sh: submitted array job $array ($tasks tasks) and merge job $merge (runs when every task has succeeded)"
