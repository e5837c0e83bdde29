#!/bin/bash
# The disk's own limit on a many-core machine, for the same bytes a conversion moves: `cp -r` + sync (one
# stream), the files copied in parallel (one `cp` per file), and each file copied as N byte ranges at once
# (`dd` with skip/seek, conv=notrunc): what "ranks that split the bytes" could reach at best.
# Usage: bash bench/device_disk.sh MODEL WORKDIR OUTDIR [WAYS]   (generates WORKDIR/hf unless it exists)
set -u
calc() { awk "BEGIN { printf \"%.2f\", $* }"; }  # no bc on the device machine
MODEL=${1:-8B}; W=${2:-/var/tmp/vlbench}; OUT=${3:-/tmp/out}; WAYS=${4:-4 8 16}
mkdir -p "$W" "$OUT"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
S="$W/hf"
now() { date +%s.%N; }
since() { calc "$(now) - $1"; }
{
echo "== disk $(date -u +%FT%TZ)"; nproc; df -h "$W" | tail -1
if [ ! -d "$S" ]; then t=$(now); python3 bench/bench_convert.py --make-source "$S" --model "$MODEL" >/dev/null
  echo "generated $MODEL in $(since "$t") s"; fi
du -sb "$S" | cut -f1 | awk '{printf "bytes %.0f (%.2f GB)\n", $1, $1/1e9}'
for i in ${CP_RUNS:-1 2}; do
  rm -rf "$W/d"; sync; t=$(now); cp -r --reflink=never "$S" "$W/d"; sync; echo "cp -r + sync: $(since "$t") s"
done
rm -rf "$W/d"; sync; mkdir "$W/d"; t=$(now)
ls "$S" | xargs -P 16 -I{} cp --reflink=never "$S/{}" "$W/d/{}"; sync
echo "cp, one process per file + sync: $(since "$t") s"
for ways in $WAYS; do
  rm -rf "$W/d"; sync; mkdir "$W/d"; t=$(now)
  for f in $(ls "$S"); do
    size=$(stat -c %s "$S/$f"); blocks=$(( (size + 67108863) / 67108864 )); per=$(( (blocks + ways - 1) / ways ))
    for ((i = 0; i < ways; i++)); do
      dd if="$S/$f" of="$W/d/$f" bs=64M skip=$((i * per)) seek=$((i * per)) count=$per conv=notrunc status=none &
    done
  done
  wait; sync
  echo "dd, every file as $ways byte ranges at once + sync: $(since "$t") s"
done
cmp -s "$S/$(ls "$S" | head -1)" "$W/d/$(ls "$S" | head -1)" && echo "ranged copy identical"
rm -rf "$W/d"; sync
} 2>&1 | tee -a "$OUT/log.txt"
