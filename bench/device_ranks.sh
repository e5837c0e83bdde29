#!/bin/bash
# Ranks that split the bytes (issue 21): each route of a full-size model in one process (--workers 1), with
# --workers N (processes forked by the command) and under torchrun with N ranks, each run after a `cp -r` + sync
# of the same input (its time printed beside), wall time with start-up and a final sync; outputs compared byte
# for byte with the one-process output (cmp of manifests).
# Usage: bash bench/device_ranks.sh MODEL WORKDIR OUTDIR [ROUTES] [RANKS] [WORKERS]
#   ROUTES: dcp,megatron,hf; RANKS: "2 4 8" (torchrun; "2x4": 2 ranks forking 4 workers each; "" for none);
#   WORKERS: "4 8" (--workers in one command); WORKDIR/hf is reused; ROUTES may add mhf (megatron tp 2 -> hf).
#   Each command runs under /usr/bin/time: "peak RSS" is the largest of the process and of any one of its children
set -u
calc() { awk "BEGIN { printf \"%.2f\", $* }"; }  # no bc on the device machine
MODEL=${1:-8B}; W=${2:-/var/tmp/vlbench}; OUT=${3:-/tmp/out}; ROUTES=${4:-dcp,megatron,hf}; RANKS=${5-2 4 8}; WORKERS=${6-}
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
  local t2=$(now); /usr/bin/time -o "$OUT/rss.txt" -f "%M" "$@" >/dev/null 2>"$OUT/err.txt" || tail -3 "$OUT/err.txt"
  sync; local t3=$(now)
  echo "$name: $(calc "$t3 - $t2") s, cp $(calc "$t1 - $t0") s, x cp $(calc "($t3 - $t2) / ($t1 - $t0)"),\
 peak RSS $(( $(tail -1 "$OUT/rss.txt") / 1024 )) MiB"
}
same() {  # the manifest of $W/o equals the one kept as $1
  cmp -s "$W/o/vlconvert-manifest.json" "$1" && echo "  output identical to one process" || echo "  OUTPUT DIFFERS"
}
tr="$py -m torch.distributed.run --standalone --nproc-per-node"
route() {  # name, key, input, convert arguments...: one process, then each --workers N and torchrun N
  local name=$1 key=$2 input=$3; shift 3
  pair "$name 1 process" "$input" $py -m vlconvert convert "$@" --workers 1 -q; cp "$W/o/vlconvert-manifest.json" "$OUT/$key.json"
  for n in $WORKERS; do pair "$name --workers $n" "$input" $py -m vlconvert convert "$@" --workers $n -q; same "$OUT/$key.json"; done
  for n in $RANKS; do  # N ranks, or RxW: R ranks forking W workers each
    if [[ $n == *x* ]]; then pair "$name torchrun ${n%x*} x --workers ${n#*x}" "$input" $tr ${n%x*} -m vlconvert convert "$@" --workers ${n#*x} -q
    else pair "$name torchrun $n" "$input" $tr $n -m vlconvert convert "$@" -q; fi
    same "$OUT/$key.json"; done
}
{
echo "== ranks $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $(nproc) cores"
if [ ! -d "$S" ]; then t=$(now); $py bench/bench_convert.py --make-source "$S" --model "$MODEL" >/dev/null
  echo "generated $MODEL in $(calc "$(now) - $t") s"; fi
case ",$ROUTES," in *,dcp,*) route "hf->dcp" dcp "$S" "$S" "$W/o" --to dcp;; esac
case ",$ROUTES," in *,megatron,*) route "hf->megatron tp2" mg "$S" "$S" "$W/o" --to megatron --tp 2;; esac
case ",$ROUTES," in *,hf,*)
  rm -rf "$W/dcp"; $py -m vlconvert convert "$S" "$W/dcp" --to dcp -q >/dev/null
  route "dcp->hf" hf "$W/dcp" "$W/dcp" "$W/o" --to hf --assets-dir "$S"
  rm -rf "$W/dcp";;
esac
case ",$ROUTES," in *,mhf,*)
  rm -rf "$W/mg"; $py -m vlconvert convert "$S" "$W/mg" --to megatron --tp 2 -q >/dev/null
  route "megatron tp2->hf" mhf "$W/mg" "$W/mg" "$W/o" --to hf --assets-dir "$S"
  rm -rf "$W/mg";;
esac
rm -rf "$W/o"
} 2>&1 | tee -a "$OUT/log.txt"
