#!/bin/bash
# Where hf->megatron --tp 2 of a full-size model spends its time on a many-core machine: the route with
# torch's default intra-op threads, with OMP_NUM_THREADS=4 and =1, under torchrun 2 (one rank file per
# process), each after a `cp -r` + sync of the same input; then bench/profile_route.py (per-thread CPU).
# Usage: bash bench/device_megatron.sh MODEL WORKDIR OUTDIR
set -u
calc() { awk "BEGIN { printf \"%.2f\", $* }"; }  # no bc on the device machine
MODEL=${1:-8B}; W=${2:-/var/tmp/vlbench}; OUT=${3:-/tmp/out}
mkdir -p "$W" "$OUT"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
py=python3
S="$W/hf"
{
echo "== machine $(date -u +%FT%TZ)"; nproc
$py -c "import torch; print(torch.__version__, 'intra-op threads', torch.get_num_threads())"
if [ ! -d "$S" ]; then t=$(date +%s.%N); $py bench/bench_convert.py --make-source "$S" --model "$MODEL" >/dev/null
  echo "generated $MODEL in $(calc "$(date +%s.%N) - $t") s"; fi
pair() {  # name, command...: cp + sync of the source, then the command + sync
  local name=$1; shift
  rm -rf "$W/cp" "$W/o"; sync
  local t0=$(date +%s.%N); cp -r --reflink=never "$S" "$W/cp"; sync; local t1=$(date +%s.%N)
  rm -rf "$W/cp"; sync
  local t2=$(date +%s.%N); "$@" >/dev/null; sync; local t3=$(date +%s.%N)
  echo "$name: $(calc "$t3 - $t2") s, cp $(calc "$t1 - $t0") s, x cp $(calc "($t3 - $t2) / ($t1 - $t0)")"
}
pair "hf->megatron tp2 (default threads)" $py -m vlconvert convert "$S" "$W/o" --to megatron --tp 2 -q
pair "hf->megatron tp2 OMP_NUM_THREADS=4" env OMP_NUM_THREADS=4 $py -m vlconvert convert "$S" "$W/o" --to megatron --tp 2 -q
pair "hf->megatron tp2 OMP_NUM_THREADS=1" env OMP_NUM_THREADS=1 $py -m vlconvert convert "$S" "$W/o" --to megatron --tp 2 -q
pair "hf->megatron tp2 torchrun 2" $py -m torch.distributed.run --nproc-per-node 2 -m vlconvert convert "$S" "$W/o" --to megatron --tp 2 -q
pair "hf->dcp OMP_NUM_THREADS=4" env OMP_NUM_THREADS=4 $py -m vlconvert convert "$S" "$W/o" --to dcp -q
rm -rf "$W/o"
$py bench/profile_route.py "$S" "$W/o" --to megatron --tp 2 --json "$OUT/prof_hf_mg.txt" | head -60
} 2>&1 | tee -a "$OUT/log.txt"
