"""``hf-to-megatron``, ``reshard`` and ``megatron-to-hf``: thin spellings of :class:`vlconvert.engine.Converter`.

The rank plan (:func:`~vlconvert.models.megatron_table.plan_megatron_ranks`) lives with the model's
name table, the Megatron reader in :mod:`vlconvert.sources`, the rank-file writer in
:mod:`vlconvert.layouts.megatron`; these functions keep the signatures and results the commands and
scripts have always used.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from vlconvert.dtypes import DType
from vlconvert.engine import Converter, Progress
from vlconvert.models.megatron_table import MegatronPlan, plan_megatron_ranks
from vlconvert.sources import MegatronSource

MegatronCheckpoint = MegatronSource  # the canonical reader of a Megatron checkpoint, by its older name

__all__ = ["MegatronCheckpoint", "MegatronPlan", "Result", "hf_to_megatron", "megatron_to_hf", "open_megatron",
           "plan_megatron_ranks", "reshard"]


@dataclass
class Result:
    """What a conversion did, for the summary."""

    output: Path
    files: int
    bytes: int
    notes: list[str]
    plan: MegatronPlan | None = None
    extra: dict = field(default_factory=dict)


def open_megatron(root: str | Path, config: str | Path | dict | None = None) -> MegatronSource:
    """Open a Megatron legacy checkpoint (TP/PP/EP/ETP, spec, expert style and padding detected)."""
    return MegatronSource(root, config=config)


def _run(conv: Converter, progress_factory: Progress | None) -> tuple[Result, Converter]:
    expect = getattr(progress_factory, "expect", None)
    if expect is not None:  # the command's progress bar counts files and tensors
        expect(conv.plan().files)
    result = conv.run(progress_factory)
    plan = result.plan
    megatron = plan.megatron if plan.megatron is not None else getattr(conv.source, "plan", None)
    extra = {"assets": result.assets} if plan.target == "hf" else {}
    return Result(result.output, len(plan.files), plan.tensor_bytes, result.notes, megatron, extra), conv


def hf_to_megatron(src: str | Path, dst: str | Path, *, tp: int = 1, pp: int = 1, ep: int = 1,
                   etp: int | None = None, spec: str = "te", experts: str = "grouped",
                   dtype: DType | None = None, padded_vocab_size: int | None = None,
                   make_vocab_size_divisible_by: int = 128, pp_first_layers: int | None = None,
                   pp_last_layers: int | None = None, overwrite: bool = False, iteration: int | None = None,
                   progress_factory: Progress | None = None, resume: bool = False, metadata: bool = True,
                   info: Callable[[str], None] = lambda s: None) -> Result:
    """Convert a Hugging Face Qwen3-VL folder to Megatron-Core legacy rank files."""
    conv = Converter(src, dst, to="megatron", tp=tp, pp=pp, ep=ep, etp=etp, spec=spec, experts=experts,
                     dtype=dtype or "keep", padded_vocab_size=padded_vocab_size,
                     make_vocab_size_divisible_by=make_vocab_size_divisible_by, pp_first_layers=pp_first_layers,
                     pp_last_layers=pp_last_layers, overwrite=overwrite, iteration=iteration, resume=resume,
                     metadata=metadata, info=info, source_layout="hf")
    return _run(conv, progress_factory)[0]


def reshard(src: str | Path, dst: str | Path, *, tp: int = 1, pp: int = 1, ep: int = 1, etp: int | None = None,
            spec: str | None = None, experts: str | None = None, dtype: DType | None = None,
            padded_vocab_size: int | None = None, make_vocab_size_divisible_by: int = 128,
            pp_first_layers: int | None = None, pp_last_layers: int | None = None,
            config: str | Path | None = None, overwrite: bool = False, iteration: int | None = None,
            progress_factory: Progress | None = None, resume: bool = False,
            info: Callable[[str], None] = lambda s: None) -> Result:
    """Megatron -> Megatron with new TP/PP/EP sizes, directly (same bytes as converting from HF)."""
    conv = Converter(src, dst, to="megatron", tp=tp, pp=pp, ep=ep, etp=etp, spec=spec, experts=experts,
                     dtype=dtype or "keep", padded_vocab_size=padded_vocab_size,
                     make_vocab_size_divisible_by=make_vocab_size_divisible_by, pp_first_layers=pp_first_layers,
                     pp_last_layers=pp_last_layers, config=config, overwrite=overwrite, iteration=iteration,
                     resume=resume, info=info, source_layout="megatron")
    return _run(conv, progress_factory)[0]


def megatron_to_hf(src: str | Path, dst: str | Path, *, assets_dir: str | Path, max_shard_size: str | int = "5GB",
                   dtype: DType | None = None, overwrite: bool = False, progress_factory: Progress | None = None,
                   resume: bool = False, info: Callable[[str], None] = lambda s: None) -> Result:
    """Megatron legacy rank files -> Hugging Face folder: weights from the ranks, every other file copied
    byte for byte from ``assets_dir`` (the original HF folder); experts in the released orientation."""
    conv = Converter(src, dst, to="hf", assets_dir=assets_dir, max_shard_size=max_shard_size,
                     dtype=dtype or "keep", experts_layout="released", overwrite=overwrite, resume=resume, info=info,
                     source_layout="megatron")
    return _run(conv, progress_factory)[0]
