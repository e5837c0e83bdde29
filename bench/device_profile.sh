#!/bin/bash
# One batch of measurements on a many-core machine (the lent GPU machine): start-up costs, then where
# time goes in hf->dcp, dcp->hf and hf->megatron --tp 2 of a full-size model (bench/profile_route.py),
# then the same routes under torchrun. Usage: bash bench/device_profile.sh MODEL WORKDIR OUTDIR
set -u
calc() { awk "BEGIN { printf \"%.2f\", $* }"; }  # no bc on the device machine
MODEL=${1:-8B}; W=${2:-/var/tmp/vlbench}; OUT=${3:-/tmp/out}
mkdir -p "$W" "$OUT"
export PYTHONUNBUFFERED=1
py=python3
echo "== machine"; nproc; free -g | head -2; df -h "$W" | tail -1
$py -c "import torch, transformers, sys; print(sys.version.split()[0], torch.__version__, transformers.__version__)"
echo "== start-up (warm, 3 runs each)"
for i in 1 2 3; do /usr/bin/time -f "import torch %e s" $py -c "import torch"; done
for i in 1 2 3; do /usr/bin/time -f "import torch.distributed.checkpoint %e s" $py -c "import torch.distributed.checkpoint"; done
echo "== generate $MODEL"
t=$(date +%s.%N); $py bench/bench_convert.py --make-source "$W/hf" --model "$MODEL"; echo "generated in $(calc "$(date +%s.%N) - $t") s"
for i in 1 2 3; do /usr/bin/time -f "dry-run hf->dcp %e s" $py -m vlconvert convert "$W/hf" "$W/x" --to dcp --dry-run -q >/dev/null; done
for i in 1 2; do /usr/bin/time -f "dry-run hf->megatron tp2 %e s" $py -m vlconvert convert "$W/hf" "$W/x" --to megatron --tp 2 --dry-run -q >/dev/null; done
echo "== profiles"
$py bench/profile_route.py "$W/hf" "$W/dcp" --to dcp --keep --json "$OUT/prof_hf_dcp.txt" | head -40
$py bench/profile_route.py "$W/dcp" "$W/o" --to hf --assets-dir "$W/hf" --json "$OUT/prof_dcp_hf.txt" | head -40
rm -rf "$W/dcp"
$py bench/profile_route.py "$W/hf" "$W/o" --to megatron --tp 2 --json "$OUT/prof_hf_mg.txt" | head -40
echo "== torchrun hf->dcp"
for n in 1 4 8; do
  rm -rf "$W/o"; sync
  /usr/bin/time -f "torchrun $n hf->dcp %e s" $py -m torch.distributed.run --nproc-per-node $n -m vlconvert convert "$W/hf" "$W/o" --to dcp -q >/dev/null && sync
done
rm -rf "$W/o"
