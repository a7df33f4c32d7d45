#!/bin/bash
# One search in one process against the same search split across two (accelerate launch, CPU processes over gloo),
# one thread a process, side by side; prints a markdown table. Rerun: bash nbs/bench/processes/run.sh > nbs/bench/processes/processes.md
set -e
P="a red circle left of a blue square"
OUT=$(mktemp -d)
echo "One search, one process against two (\`accelerate launch --multi_gpu --num_processes 2 -m noiseopt search\`), \`--batch-size 2 --device cpu\`, one thread a process, on \"$P\" (this script, $(nproc) cores)."
echo
echo "| search | budget | one process: search s (whole run s) | two processes: search s (whole run s) | speed-up of the search | same candidates and choice | largest score difference |"
echo "| --- | --- | --- | --- | --- | --- | --- |"
for run in "random 800" "smc 400" "paths 400"; do
  set -- $run
  s=$(date +%s.%N); OMP_NUM_THREADS=1 noiseopt search "$P" --algo $1 --budget $2 --batch-size 2 --device cpu --out $OUT/$1-1 --quiet > /dev/null 2>&1; e=$(date +%s.%N)
  s2=$(date +%s.%N); OMP_NUM_THREADS=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no -m noiseopt search "$P" --algo $1 --budget $2 --batch-size 2 --device cpu --out $OUT/$1-2 --quiet > /dev/null 2>&1; e2=$(date +%s.%N)
  python - "$OUT/$1-1" "$OUT/$1-2" "$1" "$2" "$s" "$e" "$s2" "$e2" <<'PY'
import json, sys
one, two, algo, budget, s, e, s2, e2 = sys.argv[1:]
a, b = (json.load(open(f"{d}/result.json")) for d in (one, two))
same = a["best_index"] == b["best_index"] and len(a["candidates"]) == len(b["candidates"]) and all(
    x["seeds"] == y["seeds"] and x["step"] == y["step"] and x["nfe"] == y["nfe"] for x, y in zip(a["candidates"], b["candidates"]))
diff = max(abs(x["scores"][k] - y["scores"][k]) for x, y in zip(a["candidates"], b["candidates"]) for k in x["scores"])
print(f"| {algo} | {budget} | {a['wall_time']:.1f} ({float(e) - float(s):.1f}) | {b['wall_time']:.1f} ({float(e2) - float(s2):.1f}) | "
      f"{a['wall_time'] / b['wall_time']:.2f} | {'yes' if same else 'NO'} ({len(a['candidates'])} candidates) | {diff:.1g} |")
PY
done
rm -rf $OUT
