"""``--to torch_dist``: plan and stream a megatron-core ``torch_dist`` checkpoint.

The global view is the tp=1 legacy plan: each legacy tensor is one chunk of a stacked global tensor
(layer axis; experts add an expert axis), streamed from its row map with :func:`vlconvert.plan.rank_tensor_blocks`.
``--tp`` only sets the vocabulary padding (Megatron pads to a multiple of 128 x TP); the checkpoint
loads at any TP/PP/EP. Language-model linears get the ``_extra_state`` byte entries megatron-core's
default (strict) load requires.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from vlconvert import ops
from vlconvert.dtypes import DType
from vlconvert.layouts import megatron as mlay
from vlconvert.layouts import torch_dist as tdl
from vlconvert.layouts.dcp import TensorBlocks
from vlconvert.models.base import Skeleton
from vlconvert.models.megatron_table import RankTensor, hf_vision_tensors, plan_megatron_ranks
from vlconvert.plan import ConversionPlan, PlannedFile, out_dtype
from vlconvert.publish import write_bytes
from vlconvert.targets.base import Conversion, Target
from vlconvert.targets.megatron import MEGATRON_OPTIONS

if TYPE_CHECKING:
    from vlconvert.sources import Source

DATA_FILE = "__0_0.distcp"


def _out_name(name: str, local: bool, prefix: str, mlm: str, vision: bool) -> str:
    """A legacy tp=1 name as the consumer's model calls it in its sharded state dict (``mlm``: the family's
    Megatron language-model prefix, ``prefix``: the consumer's; ``vision``: a vision-tower tensor)."""
    if vision or not name.startswith(mlm):
        return name
    if local:  # megatron-core maps the GPT local spec's norms to TE names on save
        for local_name, te_name in tdl.LOCAL_NORM_NAMES:
            name = name.replace(local_name, te_name)
    return prefix + name[len(mlm):]


def _layer_kinds(tensors: list[RankTensor], mlm: str) -> dict[str, frozenset[str]]:
    """Per decoder layer number, the names its tensors have inside the layer (experts' numbers dropped)."""
    head = f"{mlm}decoder.layers."
    kinds: dict[str, set[str]] = {}
    for t in tensors:
        if t.name.startswith(head):
            layer, _, rest = t.name[len(head):].partition(".")
            kinds.setdefault(layer, set()).add(rest.split(".local_experts.")[0].rstrip("0123456789"))
    return {layer: frozenset(names) for layer, names in kinds.items()}


def lm_prefix(skeleton: Skeleton, flavour: tdl.Consumer) -> str:
    """The language model's key prefix in the consumer's model: its own for a VL model; none for a family whose
    Megatron model is a plain GPTModel (the text models)."""
    return flavour.prefix if skeleton.family.megatron_prefixes.language else ""


def chunks(plan: ConversionPlan) -> list[tuple[RankTensor, tdl.GlobalKey, list[str]]]:
    """Every tp=1 tensor with its torch_dist key/index and the ``_extra_state`` keys that follow it."""
    assert plan.megatron is not None
    info = plan.megatron.skeleton.info
    prefixes = plan.megatron.skeleton.family.megatron_prefixes
    flavour = tdl.consumer(plan.consumer)
    local = plan.megatron.spec == "local"
    out = []

    def vision(name: str) -> bool:
        return prefixes.vision is not None and name.startswith(prefixes.vision)

    tensors = [t for t in plan.megatron.ranks[0].tensors if not vision(t.name)]
    if flavour.vision == "megatron":
        tensors = [t for t in plan.megatron.ranks[0].tensors if vision(t.name)] + tensors
    prefix = lm_prefix(plan.megatron.skeleton, flavour)
    # layers of different kinds (MoE mixed with dense ones, linear attention with full): megatron-core saves
    # every decoder layer under its own number (non-homogeneous layers), not stacked
    per_layer = len(set(_layer_kinds(plan.megatron.ranks[0].tensors, prefixes.language).values())) > 1
    for t in tensors:
        name = _out_name(t.name, local, prefix, prefixes.language, vision(t.name))
        gk = tdl.global_key(name, info.layers, info.vision_depth, len(info.deepstack), info.experts or 0, prefix)
        if per_layer and gk.alt is not None and not vision(t.name):
            gk = tdl.GlobalKey(gk.alt, gk.index[1:], gk.stack[1:])
        out.append((replace(t, name=name), gk, tdl.extra_state_keys(gk, name)))
    if flavour.vision == "hf":
        out = [(t, tdl.GlobalKey(t.name, (), ()), []) for t in plan.torch_dist_extra] + out
    return out


def plan_torch_dist(conv: Conversion, source: Source, dtype: DType | None) -> ConversionPlan:
    """The tp=1 Megatron plan (vocabulary padded as the consumer builds the model) and the one data file."""
    o = conv.options
    flavour = tdl.consumer(o.get("consumer"))
    sk = source.skeleton
    previous = getattr(source, "plan", None)
    spec = o["spec"] or getattr(previous, "spec", None) or "te"
    padded = vocab_rows(sk.shape_in(sk.family.embed, "released")[0], o, flavour)
    if source.layout == "torch_dist" and o["padded_vocab_size"] is None and o["tp"] == 1 and previous is not None \
            and flavour.pad_vocab:
        padded = previous.padded_vocab  # keep the source's padding unless asked otherwise
    source_dtypes = {n: out_dtype(source.spec(n)[1], dtype) for n in source.names()}
    return torch_dist_plan(sk, o, dtype, source_dtypes, padded, str(source.folder), source.layout, spec)


def vocab_rows(vocab: int, o: dict, flavour: tdl.Consumer) -> int:
    """The embedding rows the consumer's model is built with (``--padded-vocab-size`` wins)."""
    if flavour.pad_vocab or o["padded_vocab_size"] is not None:
        return ops.padded_vocab_size(vocab, o["tp"], o["make_vocab_size_divisible_by"], o["padded_vocab_size"])
    return vocab


def torch_dist_plan(sk: Skeleton, o: dict, dtype: DType | None, source_dtypes: dict[str, DType],
                    padded: int, source: str, source_layout: str, spec: str) -> ConversionPlan:
    """The plan of a torch_dist output for ``o["consumer"]``: files, tensors (with their keys), notes."""
    flavour = tdl.consumer(o.get("consumer"))
    if flavour.run_config:  # the framework's record of the model: refused in one line where not known
        sk.family.bridge_model_config(sk.info, consumer=flavour.name)
    vocab = sk.shape_in(sk.family.embed, "released")[0]
    mplan = plan_megatron_ranks(sk, 1, 1, 1, spec=spec, experts="sequential", dtype=dtype,
                                padded_vocab_size=padded, source_dtypes=source_dtypes)
    iteration = flavour.iteration_for(o["iteration"])
    it = mlay.iteration_folder(iteration)
    assets = [mlay.TRACKER, f"{it}/{tdl.COMMON}", f"{it}/{tdl.METADATA_JSON}"]
    if flavour.run_config:
        assets += [tdl.LATEST_TRAIN_STATE, f"{it}/{tdl.TRAIN_STATE}", f"{it}/{tdl.RUN_CONFIG}"]
    plan = ConversionPlan(source, source_layout, "torch_dist", dtype, None, [], megatron=mplan, assets=assets)
    plan.consumer = flavour.name
    plan.torch_dist_extra = hf_vision_tensors(sk, source_dtypes, flavour.hf_vision_prefix) \
        if flavour.vision == "hf" else []
    records = [(f"{gk.key}{list(gk.index)}", t.shape, t.dtype) for t, gk, _ in chunks(plan)]
    plan.files = [PlannedFile(f"{it}/{DATA_FILE}", records)]
    plan.notes = [f"torch_dist for {flavour.name}: global tensors (layers stacked), spec {spec}, vocabulary "
                  f"{'padded to ' if padded > vocab else ''}{padded} rows; loads at any TP/PP/EP"]
    if flavour.vision is None:
        plan.notes.append(f"{flavour.name}: the language model only (GPTModel, unprefixed keys); the vision tower "
                          "is not written")
    if o["pp"] > 1 or o["ep"] > 1:
        plan.notes.append("--pp/--ep do not change a torch_dist checkpoint (tensors are stored unsharded)")
    plan.notes.append(f"load it: {flavour.load}")
    return plan


def _hf_folder(conv: Conversion) -> str | None:
    """The Hugging Face model of the run (``--assets-dir``, or an HF source) as Bridge's ``hf_model_id``: the
    model id when one from the local cache was given (portable), else the folder's absolute path."""
    typed = conv.assets_dir if conv.assets_dir is not None else (conv.src if conv.source.layout == "hf" else None)
    if typed is not None and not Path(str(typed)).expanduser().exists():
        return str(typed)  # a model id, found in the local Hugging Face cache
    folder = conv.assets or (conv.source.folder if conv.source.layout == "hf" else None)
    return str(Path(folder).resolve()) if folder is not None else None


def write_torch_dist(conv: Conversion, stage: Path, plan: ConversionPlan, advance: Callable[[int], None]) -> None:
    """Stream every chunk (one legacy tp=1 tensor at a time), then the common state (inside the DCP and as
    ``common.pt``), ``metadata.json`` and the consumer's own files (tracker, train state, run config)."""
    o = conv.options
    flavour = tdl.consumer(plan.consumer)
    iteration = flavour.iteration_for(o["iteration"])
    folder = stage / mlay.iteration_folder(iteration)
    folder.mkdir(exist_ok=True)
    assert plan.megatron is not None
    info = plan.megatron.skeleton.info
    meta = plan.megatron.metadata()
    meta.update(tp=o["tp"], pp=o["pp"], ep=o["ep"], etp=o["etp"] or o["tp"], consumer=flavour.name)
    family = plan.megatron.skeleton.family
    args = None
    if flavour.args:
        args = argparse.Namespace(**family.megatron_lm_args(
            info, tp=o["tp"], pp=o["pp"], ep=o["ep"], etp=o["etp"], padded_vocab=plan.megatron.padded_vocab,
            make_vocab_size_divisible_by=o["make_vocab_size_divisible_by"], dtype=plan.dtype,
            iteration=iteration or 0))
    common = tdl.common_state(iteration, meta, args)
    writer = tdl.TorchDistWriter(folder)
    extra = tdl.extra_state_bytes()
    planned = chunks(plan)
    expect: list[dict] = []
    for t, gk, extras in planned:
        expect.append({"key": gk.key, "size": [*gk.stack, *t.shape], "offsets": [*gk.index, *([0] * len(t.shape))],
                       "shape": [*([1] * len(gk.index)), *t.shape], "dtype": str(t.dtype)})
        expect += [{"key": key, "bytes": True} for key in extras]
    expect.append({"key": tdl.COMMON_STATE_KEY, "bytes": True})
    if not conv.owns(f"{folder.name}/{DATA_FILE}"):  # under torchrun: a rank with no share of the data file
        return
    try:
        writer.open_file(DATA_FILE, expect)
        for t, gk, extras in planned:
            size = (*gk.stack, *t.shape)
            offsets = (*gk.index, *([0] * len(t.shape)))
            if writer.skipping:
                writer.write_chunk(gk.key, TensorBlocks((1,) * len(gk.index) + t.shape, t.dtype, ()), offsets, size)
            else:
                blocks = TensorBlocks((1,) * len(gk.index) + t.shape, t.dtype,
                                      conv.rank_blocks(t))
                writer.write_chunk(gk.key, blocks, offsets, size, lead=len(gk.index))
            advance(t.nbytes)
            for key in extras:
                writer.write_bytes(key, extra)
        writer.write_bytes(tdl.COMMON_STATE_KEY, tdl.common_state_bytes(common))
        if conv.lead:  # .metadata needs only the records' places, which every rank's walk of the file knows
            writer.finish()
        else:
            writer.close_file()
    except BaseException:
        writer.abort()
        raise
    if not conv.lead:
        return
    tdl.write_common(folder, common)
    if flavour.run_config:
        state = tdl.train_state_bytes(iteration or 0)
        write_bytes(folder / tdl.TRAIN_STATE, state)
        write_bytes(stage / tdl.LATEST_TRAIN_STATE, state)
        run_config = {"_target_": "megatron.bridge.training.config.ConfigContainer",
                      "model": family.bridge_model_config(info, tp=o["tp"], pp=o["pp"], ep=o["ep"], etp=o["etp"],
                                                   make_vocab_size_divisible_by=o["make_vocab_size_divisible_by"],
                                                   hf_model_id=_hf_folder(conv), consumer=flavour.name),
                      "checkpoint": {"_target_": "megatron.bridge.training.config.CheckpointConfig",
                                     "ckpt_format": "torch_dist", "save_optim": False, "save_rng": False,
                                     "fully_parallel_save": True, "dist_ckpt_strictness": "assume_ok_unexpected"}}
        write_bytes(folder / tdl.RUN_CONFIG, (tdl.yaml_text(run_config) + "\n").encode())
    mlay.write_tracker(stage, iteration)


class TorchDistTarget(Target):
    """One data file of global tensors for the consumer framework (``--for``), its own files beside it. Under
    ``torchrun`` the ranks write byte ranges of the data file (:mod:`vlconvert.splitting`); rank 0 the rest."""

    name = "torch_dist"
    options = MEGATRON_OPTIONS | {"consumer"}

    def plan(self, conv: Conversion, source: Source, dtype: DType | None) -> ConversionPlan:
        return plan_torch_dist(conv, source, dtype)

    def write(self, conv: Conversion, stage: Path, plan: ConversionPlan, advance: Callable[[int], None]) -> list[str]:
        write_torch_dist(conv, stage, plan, advance)
        return []


TARGET = TorchDistTarget()
