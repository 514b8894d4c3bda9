#!/bin/sh
# Build a plan step by step with `loomctl add`, then run it: count the lines of
# every file given (in parallel, one task per file) and add the counts up.
#
#     examples/shell/count-lines.sh FILE...
#     PLAN=count.loom LOOMCTL="python -m loomctl" examples/shell/count-lines.sh *.txt
#
# Every `loomctl add` appends one task to the graph file and prints its id, which
# later tasks use as an input. The plan is kept in $PLAN (default: a temporary file).
set -eu

LOOMCTL=${LOOMCTL:-loomctl}
if [ "$#" -eq 0 ]; then
    here=$(dirname "$0")
    set -- "$here/../wordcount/plan-life.txt" "$here/../crossval/iris.libsvm"
fi
if [ -z "${PLAN:-}" ]; then
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    PLAN=$tmp/count.loom
fi
rm -f "$PLAN"

counts=
for file in "$@"; do
    data=$($LOOMCTL add "$PLAN" open "$file")                  # the file itself
    n=$($LOOMCTL add "$PLAN" run "wc -l" --stdin "$data" --label "wc:$(basename "$file")")
    counts="$counts $n"
done
all=$($LOOMCTL add "$PLAN" merge $counts)                      # "12\n34\n..."
$LOOMCTL add "$PLAN" run awk '{ s += $1 } END { print s }' --stdin "$all" --result >/dev/null

$LOOMCTL inspect "$PLAN" >&2                                  # what was built
$LOOMCTL run "$PLAN"                                          # prints the total
