#!/usr/bin/env bash
# One training rank: slurm/train.sbatch starts one of these per GPU (per CPU slot on a CPU-only
# cluster) with `srun`, which is also what makes every rank exit when one fails (--kill-on-bad-exit).
#
# Slurm's task numbers become torch.distributed's environment (env:// rendezvous at MASTER_ADDR,
# MASTER_PORT, set by the batch script), the trainer runs as a child so this shell can record its
# exit code for the batch script (75 = checkpointed after a stop signal, requeue me), and stop
# signals are passed on to it.  After a 75 it waits until every rank has recorded its exit code
# (at most 60 s), so srun's --kill-on-bad-exit cannot cut one short.
set -uo pipefail

export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID
# With --gpus-per-task or --gpu-bind a task sees only its own GPU, which is then device 0.
if [[ -n ${CUDA_VISIBLE_DEVICES:-} && $CUDA_VISIBLE_DEVICES != *,* ]]; then
    LOCAL_RANK=0
fi

python -u -m megamix train --set train.progress_bar=false "$@" &
trainer=$!
# Slurm signals every process of the step, but not every site's process tracking reaches a
# child: pass the signal on (a second copy is harmless, the trainer only records it).
trap 'kill -USR1 "$trainer" 2>/dev/null' USR1
trap 'kill -TERM "$trainer" 2>/dev/null' TERM
# `wait` also returns when a trapped signal arrives, with the signal's status: wait again until the
# trainer has ended, then once more for its own exit status (bash keeps it after reaping).
while kill -0 "$trainer" 2>/dev/null; do
    wait "$trainer"
done
wait "$trainer"
code=$?
if [[ -n ${MEGAMIX_EXIT_DIR:-} ]]; then
    echo "$code $(date +%s.%N)" >"$MEGAMIX_EXIT_DIR/rank_$RANK.exit"
    # 75: this rank saved its part of a checkpoint that every rank committed together, and the
    # others are exiting too.  srun counts any non-zero exit as a failure and terminates the other
    # ranks at once (--kill-on-bad-exit), which can kill a trainer in its last moments of exit,
    # before its code is recorded; the batch script then could not tell that every rank
    # checkpointed and would not requeue.  So wait (boundedly) until every rank has recorded.
    if ((code == 75)); then
        deadline=$((SECONDS + 60))
        shopt -s nullglob
        recorded=("$MEGAMIX_EXIT_DIR"/rank_*.exit)
        while ((${#recorded[@]} < WORLD_SIZE && SECONDS < deadline)); do
            sleep 0.2 &  # waited for in the background: a SIGTERM from srun kills it without a "Terminated" line
            wait "$!"
            recorded=("$MEGAMIX_EXIT_DIR"/rank_*.exit)
        done
    fi
fi
exit "$code"
