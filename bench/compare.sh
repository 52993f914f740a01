#!/usr/bin/env bash
# Every figure of the performance issue, before and after in the same run, taking turns:
#
#   bench/compare.sh BEFORE_TREE [PYTHON]
#
# BEFORE_TREE is a scratch checkout of the version to compare with (`git worktree add
# --detach /tmp/before <rev>`); this checkout is "after". Each benchmark runs in BEFORE_TREE, then here, with
# the load average printed before each; everything goes to stdout (tee it to a file).
# Run it on a quiet machine, at least five minutes after any large deletion (see
# docs/benchmarks.md, "Issue 15, final figures"). SKIP="overload push" leaves some out.
set -uo pipefail
before=$(cd "$1" && pwd)
after=$(cd "$(dirname "$0")/.." && pwd)
python=${2:-$after/.venv/bin/python}
skip=" ${SKIP:-} "

# One benchmark in one tree, with the load just before it.
in_tree() {
  local tree=$1
  shift
  echo "=== in $tree ($(git -C "$tree" rev-parse --short HEAD)): $*"
  echo "load: $(cut -d' ' -f1-3 /proc/loadavg) at $(date -u +%H:%M:%S)"
  (cd "$tree" && BENCH_KEEP=1 "$python" -m "$@") 2>&1 | grep -v -e WARNING -e 'INFO  \[alembic' -e 'IMAP Warning'
}

# Before, then after.
run() {
  [[ $skip == *" $1 "* ]] && return
  in_tree "$before" "${@:2}"
  in_tree "$after" "${@:2}"
}

# bench.ingest takes turns itself: mbsync, BEFORE_TREE's mailbeat, this one, in each run.
once() {
  [[ $skip == *" $1 "* ]] && return
  in_tree "$after" "${@:2}"
}

once ingest bench.ingest --messages 5000 --runs 5 --security none --baseline "$before"
once ingest bench.ingest --mailboxes 100 --messages 100 --runs 3 --security none --baseline "$before"
run handoff bench.handoff 100 100 10 2 1
# The overload bench measures both trees with this tree's bench (it runs a watcher and
# splits CPU by process kind): its files are copied into BEFORE_TREE, a scratch checkout.
cp "$after/bench/schedule_overload.py" "$after/bench/stack.py" "$before/bench/"
run overload bench.schedule_overload 2000 10 210 2 4 90
run push bench.idle_push --mailboxes 1000 --seconds 60 --rest 20
run crash bench.crash_recovery
echo "done at $(date -u +%H:%M:%S), load: $(cut -d' ' -f1-3 /proc/loadavg)"
