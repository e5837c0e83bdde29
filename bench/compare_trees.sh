#!/bin/bash
# Two source trees of vlconvert, alternated RUNS times on one model, each conversion after a `cp -r` + sync of its
# input; wall time and peak RSS (/usr/bin/time) of each. Before/after figures of a change, same machine and disk.
#   torch_dist: hf->torch_dist (--tp 2, Bridge);  verify: the HF folder against its Megatron tp 2 conversion;
#   cast: an fp32 DCP (as an FSDP job saves its master weights) -> HF in the config's bf16 (the default --dtype auto)
# Usage: bash bench/compare_trees.sh BEFORE_TREE AFTER_TREE WORKDIR [RUNS] [ROUTES]   (WORKDIR/hf: the model, e.g.
#   from python bench/bench_convert.py --make-source WORKDIR/hf --model 2B; ROUTES default "torch_dist verify")
set -u
A=$(realpath "$1"); B=$(realpath "$2"); W=$3; RUNS=${4:-2}; ROUTES=${5:-torch_dist verify}; S=$W/hf
now() { date +%s.%N; }
secs() { awk "BEGIN { printf \"%.2f\", $1 - $2 }"; }
vlc() { local tree=$1; shift; (cd /tmp && PYTHONPATH=$tree /usr/bin/time -o /tmp/vlc-rss -f %M python -m vlconvert "$@"); }
rss() { echo "peak RSS $(( $(tail -1 /tmp/vlc-rss) / 1024 )) MiB"; }
paired() {  # tree, label, input, convert arguments...: cp -r + sync of the input, then the conversion + sync
  local tree=$1 label=$2 input=$3; shift 3
  rm -rf "$W/cp" "$W/o"; sync; local a b c e; a=$(now); cp -r --reflink=never "$input" "$W/cp"; sync; b=$(now)
  rm -rf "$W/cp"; sync
  c=$(now); vlc "$tree" convert "$@" -q >/dev/null; sync; e=$(now)
  echo "$tree run $i $label: $(secs "$e" "$c") s, cp $(secs "$b" "$a") s, $(rss)"
}
case " $ROUTES " in *" verify "*)
  rm -rf "$W/mg"; (cd /tmp && PYTHONPATH=$B python -m vlconvert convert "$S" "$W/mg" --to megatron --tp 2 -q >/dev/null);; esac
case " $ROUTES " in *" cast "*)
  rm -rf "$W/dcp32"; (cd /tmp && PYTHONPATH=$B python -m vlconvert convert "$S" "$W/dcp32" --to dcp --dtype fp32 -q >/dev/null);; esac
for i in $(seq "$RUNS"); do for tree in "$A" "$B"; do
  case " $ROUTES " in *" torch_dist "*)
    paired "$tree" "hf->torch_dist tp2" "$S" "$S" "$W/o" --to torch_dist --tp 2 --for megatron-bridge;; esac
  case " $ROUTES " in *" cast "*)
    paired "$tree" "dcp fp32->hf bf16" "$W/dcp32" "$W/dcp32" "$W/o" --to hf --assets-dir "$S";; esac
  case " $ROUTES " in *" verify "*)
    f=$(now); verdict=$(vlc "$tree" verify "$S" "$W/mg" --assets-dir "$S" | tail -1); g=$(now)
    echo "$tree run $i verify hf vs megatron tp2: $(secs "$g" "$f") s, $(rss): ${verdict##*: }";; esac
done; done
rm -rf "$W/o" "$W/mg" "$W/dcp32"
