"""``convert --to torch_dist``: plan and stream a megatron-core ``torch_dist`` checkpoint.

The global view is the tp=1 legacy plan: each legacy tensor is one chunk of a stacked global tensor
(layer axis; experts add an expert axis), streamed from its row map with :func:`vlconvert.plan.rank_tensor_blocks`.
``--tp`` only sets the vocabulary padding (Megatron pads to a multiple of 128 x TP); the checkpoint
loads at any TP/PP/EP. Language-model linears get the ``_extra_state`` byte entries megatron-core's
default (strict) load requires.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vlconvert import ops
from vlconvert.layouts import megatron as mlay
from vlconvert.layouts import torch_dist as tdl
from vlconvert.layouts.dcp import TensorBlocks
from vlconvert.models.qwen3vl_megatron import RankTensor, plan_megatron_ranks
from vlconvert.plan import ConversionPlan, PlannedFile, out_dtype, rank_tensor_blocks

if TYPE_CHECKING:
    from vlconvert.sources import Source

DATA_FILE = "__0_0.distcp"


def chunks(plan: ConversionPlan) -> list[tuple[RankTensor, tdl.GlobalKey, list[str]]]:
    """Every tp=1 tensor with its torch_dist key/index and the ``_extra_state`` keys that follow it."""
    assert plan.megatron is not None
    info = plan.megatron.skeleton.info
    out = []
    local = plan.megatron.spec == "local"
    for t in plan.megatron.ranks[0].tensors:
        name = t.name
        if local:  # megatron-core saves the local spec's norms under TE names (its sharded_state_dict_keys_map)
            name = name.replace(".input_layernorm.", ".self_attention.linear_qkv.layer_norm_")
            name = name.replace(".pre_mlp_layernorm.", ".mlp.linear_fc1.layer_norm_")
        gk = tdl.global_key(name, info.layers, info.vision_depth, len(info.deepstack), info.experts or 0)
        out.append((t, gk, tdl.extra_state_keys(gk, name)))
    return out


def plan_torch_dist(conv: Any, source: Source, dtype: torch.dtype | None) -> ConversionPlan:
    """The tp=1 Megatron plan (vocabulary padded as for ``--tp``) and the one data file it fills."""
    o = conv.options
    sk = source.skeleton
    previous = getattr(source, "plan", None)
    spec = o["spec"] or getattr(previous, "spec", None) or "te"
    vocab = sk.shape_in("model.language_model.embed_tokens.weight", "released")[0]
    padded = ops.padded_vocab_size(vocab, o["tp"], o["make_vocab_size_divisible_by"], o["padded_vocab_size"])
    if source.layout == "torch_dist" and o["padded_vocab_size"] is None and o["tp"] == 1 and previous is not None:
        padded = previous.padded_vocab  # keep the source's padding unless asked otherwise
    source_dtypes = {n: out_dtype(source.spec(n)[1], dtype) for n in source.names()}
    mplan = plan_megatron_ranks(sk, 1, 1, 1, spec=spec, experts="sequential", dtype=dtype,
                                padded_vocab_size=padded, source_dtypes=source_dtypes)
    it = mlay.iteration_folder(o["iteration"])
    plan = ConversionPlan(str(source.folder), source.layout, "torch_dist", dtype, None, [], megatron=mplan,
                          assets=[mlay.TRACKER, f"{it}/{tdl.COMMON}", f"{it}/{tdl.METADATA_JSON}"])
    plan.files = [PlannedFile(f"{it}/{DATA_FILE}", [(f"{gk.key}{list(gk.index)}", t.shape, t.dtype)
                                                    for t, gk, _ in chunks(plan)])]
    plan.notes = [f"torch_dist: global tensors (layers stacked), spec {spec}, vocabulary padded to {padded}; "
                  "loads at any TP/PP/EP"]
    if o["pp"] > 1 or o["ep"] > 1:
        plan.notes.append("--pp/--ep do not change a torch_dist checkpoint (tensors are stored unsharded)")
    return plan


def write_torch_dist(conv: Any, stage: Path, plan: ConversionPlan, advance: Callable[[int], None]) -> None:
    """Stream every chunk (one legacy tp=1 tensor at a time), then ``.metadata``, common.pt, metadata.json."""
    source = conv.source
    iteration = conv.options["iteration"]
    folder = stage / mlay.iteration_folder(iteration)
    folder.mkdir(exist_ok=True)
    writer = tdl.TorchDistWriter(folder)
    extra = tdl.extra_state_bytes()
    try:
        writer.open_file(DATA_FILE)
        for t, gk, extras in chunks(plan):
            size = (*gk.stack, *t.shape)
            offsets = (*gk.index, *([0] * len(t.shape)))
            if writer.skipping:
                writer.write_chunk(gk.key, torch.empty((1,) * len(gk.index) + t.shape, device="meta"), offsets, size)
            else:
                blocks = TensorBlocks((1,) * len(gk.index) + t.shape, t.dtype,
                                      rank_tensor_blocks(t, source, conv.block_bytes))
                writer.write_chunk(gk.key, blocks, offsets, size, lead=len(gk.index))
            advance(t.nbytes)
            for key in extras:
                writer.write_bytes(key, extra)
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    assert plan.megatron is not None
    meta = plan.megatron.metadata()
    meta.update(tp=conv.options["tp"], pp=conv.options["pp"], ep=conv.options["ep"],
                etp=conv.options["etp"] or conv.options["tp"])
    tdl.write_common(folder, iteration, meta)
    mlay.write_tracker(stage, iteration)
