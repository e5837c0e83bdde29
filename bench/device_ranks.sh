#!/bin/bash
# Ranks that split the bytes (issue 21): each route of a full-size model in one process and under torchrun
# with N ranks, each run after a `cp -r` + sync of the same input (its time printed beside), wall time with
# start-up and a final sync; outputs compared byte for byte with the one-process output (cmp of manifests).
# Usage: bash bench/device_ranks.sh MODEL WORKDIR OUTDIR [ROUTES] [RANKS]
#   ROUTES: dcp,megatron,hf; RANKS: "2 4 8"; WORKDIR/hf is reused when it exists
set -u
calc() { awk "BEGIN { printf \"%.2f\", $* }"; }  # no bc on the device machine
MODEL=${1:-8B}; W=${2:-/var/tmp/vlbench}; OUT=${3:-/tmp/out}; ROUTES=${4:-dcp,megatron,hf}; RANKS=${5:-2 4 8}
mkdir -p "$W" "$OUT"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
py=python3
S="$W/hf"
now() { date +%s.%N; }
pair() {  # name, input, command...: cp -r + sync of the input, then the command + sync
  local name=$1 input=$2; shift 2
  rm -rf "$W/cp" "$W/o"; sync
  local t0=$(now); cp -r --reflink=never "$input" "$W/cp"; sync; local t1=$(now)
  rm -rf "$W/cp"; sync
  local t2=$(now); "$@" >/dev/null 2>"$OUT/err.txt" || tail -3 "$OUT/err.txt"; sync; local t3=$(now)
  echo "$name: $(calc "$t3 - $t2") s, cp $(calc "$t1 - $t0") s, x cp $(calc "($t3 - $t2) / ($t1 - $t0)")"
}
same() {  # the manifest of $W/o equals the one kept as $1
  cmp -s "$W/o/vlconvert-manifest.json" "$1" && echo "  output identical to one process" || echo "  OUTPUT DIFFERS"
}
tr() { local n=$1; shift; $py -m torch.distributed.run --standalone --nproc-per-node "$n" -m vlconvert "$@"; }
{
echo "== ranks $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $(nproc) cores"
if [ ! -d "$S" ]; then t=$(now); $py bench/bench_convert.py --make-source "$S" --model "$MODEL" >/dev/null
  echo "generated $MODEL in $(calc "$(now) - $t") s"; fi
case ",$ROUTES," in *,dcp,*)
  pair "hf->dcp 1 process" "$S" $py -m vlconvert convert "$S" "$W/o" --to dcp -q; cp "$W/o/vlconvert-manifest.json" "$OUT/dcp.json"
  for n in $RANKS; do pair "hf->dcp torchrun $n" "$S" tr $n convert "$S" "$W/o" --to dcp -q; same "$OUT/dcp.json"; done;;
esac
case ",$ROUTES," in *,megatron,*)
  pair "hf->megatron tp2 1 process" "$S" $py -m vlconvert convert "$S" "$W/o" --to megatron --tp 2 -q
  cp "$W/o/vlconvert-manifest.json" "$OUT/mg.json"
  for n in $RANKS; do pair "hf->megatron tp2 torchrun $n" "$S" tr $n convert "$S" "$W/o" --to megatron --tp 2 -q
    same "$OUT/mg.json"; done;;
esac
case ",$ROUTES," in *,hf,*)
  rm -rf "$W/dcp"; $py -m vlconvert convert "$S" "$W/dcp" --to dcp -q
  pair "dcp->hf 1 process" "$W/dcp" $py -m vlconvert convert "$W/dcp" "$W/o" --to hf --assets-dir "$S" -q
  cp "$W/o/vlconvert-manifest.json" "$OUT/hf.json"
  for n in $RANKS; do pair "dcp->hf torchrun $n" "$W/dcp" tr $n convert "$W/dcp" "$W/o" --to hf --assets-dir "$S" -q
    same "$OUT/hf.json"; done
  rm -rf "$W/dcp";;
esac
rm -rf "$W/o"
} 2>&1 | tee -a "$OUT/log.txt"
