#!/bin/bash
# One batch of many-core measurements (the lent GPU machine's CPUs): start-up, then every route of a
# full-size model against `cp -r` + sync of the same input and PyTorch's own routes, and hf->dcp under
# torchrun. Results go to OUTDIR (log.txt, bench.json). Fits one 10-minute call for the 8B (17.5 GB).
# Usage: bash bench/device_batch.sh MODEL WORKDIR OUTDIR [RANKS]
set -u
MODEL=${1:-8B}; W=${2:-/var/tmp/vlbench}; OUT=${3:-/tmp/out}; RANKS=${4:-4,8}
mkdir -p "$W" "$OUT"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
py=python3
{
echo "== machine $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
nproc; free -g | head -2; df -h "$W" | tail -1
$py -c "import torch, transformers, sys; print(sys.version.split()[0], torch.__version__, transformers.__version__)"
echo "== start-up (warm, 3 runs each)"
for i in 1 2 3; do /usr/bin/time -f "import torch %e s" $py -c "import torch"; done
for i in 1 2 3; do /usr/bin/time -f "import torch.distributed.checkpoint %e s" $py -c "import torch.distributed.checkpoint"; done
for i in 1 2 3; do /usr/bin/time -f "vlconvert --version %e s" $py -m vlconvert --version >/dev/null; done
} 2>&1 | tee "$OUT/log.txt"
$py bench/bench_convert.py --model "$MODEL" --runs 1 --work "$W" --keep --ranks "$RANKS" \
  --only "hf->dcp,hf->dcp (torch: HF reader + dcp.save),hf->dcp torchrun 4 ranks,hf->dcp torchrun 8 ranks,hf->megatron --tp 2,megatron->hf,dcp->hf,dcp->hf (torch: dcp.load + HF writer)" \
  2>&1 | tee -a "$OUT/log.txt" | tee "$OUT/bench.json" | grep -v '^[ {}]' 
S="$W/$MODEL/hf"
{
echo "== fixed cost (3 runs each)"
for i in 1 2 3; do /usr/bin/time -f "dry-run hf->dcp %e s" $py -m vlconvert convert "$S" "$W/x" --to dcp --dry-run >/dev/null; done
for i in 1 2 3; do /usr/bin/time -f "dry-run hf->megatron tp2 %e s" $py -m vlconvert convert "$S" "$W/x" --to megatron --tp 2 --dry-run >/dev/null; done
} 2>&1 | tee -a "$OUT/log.txt"
