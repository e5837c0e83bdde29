#!/bin/bash
# Two source trees of vlconvert, alternated RUNS times on one model: hf->torch_dist (--tp 2, Bridge) after a
# `cp -r` + sync of the same input, then `verify` of the HF folder against its Megatron tp 2 conversion; wall
# time and peak RSS (/usr/bin/time) of each. Before/after figures of a change, on the same machine and disk.
# Usage: bash bench/compare_trees.sh BEFORE_TREE AFTER_TREE WORKDIR [RUNS]   (WORKDIR/hf: the model, e.g. from
#   python bench/bench_convert.py --make-source WORKDIR/hf --model 2B)
set -u
A=$(realpath "$1"); B=$(realpath "$2"); W=$3; RUNS=${4:-2}; S=$W/hf
now() { date +%s.%N; }
secs() { awk "BEGIN { printf \"%.2f\", $1 - $2 }"; }
rm -rf "$W/mg"; (cd /tmp && PYTHONPATH=$B python -m vlconvert convert "$S" "$W/mg" --to megatron --tp 2 -q >/dev/null)
for i in $(seq "$RUNS"); do for tree in "$A" "$B"; do
  rm -rf "$W/cp" "$W/o"; sync; a=$(now); cp -r --reflink=never "$S" "$W/cp"; sync; b=$(now); rm -rf "$W/cp"; sync
  c=$(now); (cd /tmp && PYTHONPATH=$tree /usr/bin/time -o /tmp/vlc-rss -f %M python -m vlconvert convert "$S" "$W/o" \
    --to torch_dist --tp 2 --for megatron-bridge -q >/dev/null); sync; e=$(now)
  echo "$tree run $i hf->torch_dist tp2: $(secs "$e" "$c") s, cp $(secs "$b" "$a") s, peak RSS $(( $(tail -1 /tmp/vlc-rss) / 1024 )) MiB"
  f=$(now); verdict=$(cd /tmp && PYTHONPATH=$tree /usr/bin/time -o /tmp/vlc-rss -f %M python -m vlconvert verify "$S" "$W/mg" \
    --assets-dir "$S" | tail -1); g=$(now)
  echo "$tree run $i verify hf vs megatron tp2: $(secs "$g" "$f") s, peak RSS $(( $(tail -1 /tmp/vlc-rss) / 1024 )) MiB: ${verdict##*: }"
done; done
rm -rf "$W/o" "$W/mg"
