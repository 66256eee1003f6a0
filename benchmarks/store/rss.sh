#!/bin/bash
# usage: rss.sh CONFIG LOG — runs atomforge train; samples the trainer's and its loader workers' RSS every 5 s (LOG.rss: VmRSS; LOG.anon: RssAnon/RssFile, via poll.sh)
. "$(dirname "$0")/../../.venv/bin/activate"  # the repo venv
export OMP_NUM_THREADS=1 MLFLOW_DISABLE_TELEMETRY=true
start=$(date +%s)
/usr/bin/time -f "maxrss_kb %M wall_s %e" atomforge train "$1" > "$2.out" 2>&1 &
tpid=$!
sleep 1
pid=$(pgrep -P $tpid -f "atomforge train" | head -1); ("$(dirname "$0")/poll.sh" $pid "$2.anon" &)
while kill -0 $tpid 2>/dev/null; do
  main=$(ps -o rss= -p $pid 2>/dev/null | tr -d ' ')
  kids=$(ps -o rss= --ppid $pid 2>/dev/null | awk '{s+=$1} END {print s+0}')
  echo "$(( $(date +%s) - start )) ${main:-0} $kids" >> "$2.rss"
  sleep 5
done
tail -2 "$2.out"
