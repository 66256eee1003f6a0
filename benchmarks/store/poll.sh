#!/bin/bash
# poll.sh PID OUT: every 5 s, RssAnon/RssFile (KB) of PID and of its children
pid=$1; start=$(date +%s)
while kill -0 $pid 2>/dev/null; do
  a=$(awk '/RssAnon/{print $2}' /proc/$pid/status 2>/dev/null); f=$(awk '/RssFile/{print $2}' /proc/$pid/status 2>/dev/null)
  ca=0; cf=0
  for c in $(pgrep -P $pid); do ca=$((ca + $(awk '/RssAnon/{print $2}' /proc/$c/status 2>/dev/null || echo 0))); cf=$((cf + $(awk '/RssFile/{print $2}' /proc/$c/status 2>/dev/null || echo 0))); done
  echo "$(( $(date +%s) - start )) ${a:-0} ${f:-0} $ca $cf" >> $2
  sleep 5
done
