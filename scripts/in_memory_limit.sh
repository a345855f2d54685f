#!/bin/bash
# ../shared/peers/in_memory_limit.sh with sizes in MiB or GiB: a laptop of that size, whose memory
# limit also charges the page cache (a memory cgroup; root):
#   bash scripts/in_memory_limit.sh SIZE COMMAND [ARGS...]    SIZE: 900M, 12G (or 12: GiB)
# Drops the page cache first (KEEP_CACHE=1 for a warm run) and prints the peak at the end.
set -u
size=$1; shift
case $size in
  *M) bytes=$(( ${size%M} * 1024 * 1024 ));;
  *G) bytes=$(( ${size%G} * 1024 * 1024 * 1024 ));;
  *) bytes=$(( size * 1024 * 1024 * 1024 ));;
esac
name=localmix-limit-$$
if [ -d /sys/fs/cgroup/memory ]; then
  cg=/sys/fs/cgroup/memory/$name; mkdir -p "$cg"
  echo $bytes > "$cg/memory.limit_in_bytes"; peak=$cg/memory.max_usage_in_bytes
else
  root=/sys/fs/cgroup; [ -f $root/cgroup.controllers ] || root=/sys/fs/cgroup/unified
  echo +memory > $root/cgroup.subtree_control 2>/dev/null
  cg=$root/$name; mkdir -p "$cg"; echo $bytes > "$cg/memory.max"; echo 0 > "$cg/memory.swap.max" 2>/dev/null
  peak=$cg/memory.peak
fi
[ "${KEEP_CACHE:-0}" = 1 ] || { sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null; }
bash -c 'echo $$ > "$1/cgroup.procs"; shift; exec "$@"' - "$cg" "$@"
rc=$?
echo "in_memory_limit: $size, exit $rc, peak $(awk '{printf "%.2f GiB", $1/1073741824}' "$peak" 2>/dev/null)" >&2
rmdir "$cg" 2>/dev/null
exit $rc
