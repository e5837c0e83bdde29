"""Every checkpoint layout read as one thing: canonical tensors, row by row (one reader per format).

Canonical = the Hugging Face on-disk names (``model.language_model.*``, ``model.visual.*``,
``lm_head.weight`` only when untied) with MoE experts in the **released** orientation
(``gate_up_proj`` [E, H, 2I], ``down_proj`` [E, I, H]).

A :class:`Source` answers from metadata alone which canonical tensors exist (:meth:`Source.names`,
:meth:`Source.spec`), and reads any part of them without reading more than it needs:

- ``rows(Src(name), a, b)``: rows ``a:b`` of a canonical tensor;
- ``rows(Src(name, e), a, b)``: rows of expert ``e`` of a fused expert tensor, as Megatron holds it
  ([out, in], i.e. the released per-expert matrix transposed);
- ``row_span(src, a, b)``: where rows from ``a`` lie verbatim in a file (a :class:`FileSpan`), if they do,
  so that writers copy them file to file instead of through memory;
- ``row_bytes(src, a, b)`` / ``expert_bytes(name, e, layout)``: the same rows put together as bytes
  (:class:`~vlconvert.rowbytes.ByteRows`: gathered from several places, columns of TP shares, an expert
  transposed) without torch, where no value changes; None sends the caller to ``rows``.

Writers (:mod:`vlconvert.engine`) only ever talk to this interface, so any layout converts to any other.
"""

from __future__ import annotations

from pathlib import Path

from vlconvert.errors import UserError
from vlconvert.layouts import megatron as mlay
from vlconvert.layouts.torch_dist import find_torch_dist_dir
from vlconvert.locate import resolve_source
from vlconvert.models.base import Skeleton
from vlconvert.publish import InputLog, note_input
from vlconvert.sources.base import DEFAULT_GROUP_BYTES, Source, preview
from vlconvert.sources.dcp import DCPKeyMap, DCPSource, map_dcp_keys, stored_expert_layout, strip_wrappers
from vlconvert.sources.fp8 import FP8Source, is_fp8_folder
from vlconvert.sources.hf import HFSource
from vlconvert.sources.megatron import MegatronSource
from vlconvert.sources.torch_dist import TorchDistSource
from vlconvert.sources.verl import VerlSource, is_verl_folder

__all__ = ["DEFAULT_GROUP_BYTES", "DCPKeyMap", "DCPSource", "HFSource", "MegatronSource", "Source",
           "TorchDistSource", "VerlSource", "detect_layout", "map_dcp_keys", "open_source", "preview",
           "stored_expert_layout", "strip_wrappers"]


def detect_layout(path: str | Path) -> str:
    """'hf', 'dcp', 'megatron' or 'verl' from the files a folder holds (metadata only); 'unknown' otherwise."""
    path = Path(path)
    if is_verl_folder(path) or is_verl_folder(path / "actor"):  # verl FSDP: model_world_size_W_rank_R.pt
        return "verl"
    if find_torch_dist_dir(path) is not None:  # a DCP plus metadata.json naming the torch_dist backend
        return "torch_dist"
    if (path / ".metadata").is_file() or any(path.glob("*.distcp")):
        return "dcp"
    if (path / mlay.TRACKER).is_file() or any(path.glob("mp_rank_*")) \
            or (path / "release").is_dir() or any(path.glob("iter_*")):
        return "megatron"
    if any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").is_file():
        return "hf"
    return "unknown"



# ------------------------------------------------------------------------------------------ opening
def open_source(path: str | Path, *, config: str | Path | dict | None = None, assets_dir: str | Path | None = None,
                skeleton: Skeleton | None = None, prefix: str | None = None,
                experts_layout: str | None = None, layout: str | None = None) -> Source:
    """Open any checkpoint folder (or an HF model id in the local cache) as a :class:`Source`.

    The layout is detected from its files unless ``layout`` names the one expected (its reader then says
    what is wrong with the folder). ``config``/``assets_dir`` give the model config to sources that carry
    none (a training DCP, another tool's Megatron checkpoint).
    """
    log = InputLog()  # every file and folder the reader opens (vlconvert.publish.note_input): inputs too
    source = _open(path, config, assets_dir, skeleton, prefix, experts_layout, layout)
    source.input_log = log  # live as long as the source, until it is closed
    return source


def _open(path: str | Path, config: str | Path | dict | None, assets_dir: str | Path | None,
          skeleton: Skeleton | None, prefix: str | None, experts_layout: str | None, layout: str | None) -> Source:
    text = str(path)
    folder = Path(text).expanduser()
    if not folder.exists():
        folder = resolve_source(text)  # a model id in the local Hugging Face cache, or a clear error
    if not folder.is_dir():
        raise UserError(f"'{path}' is a file: give the checkpoint folder")
    note_input(folder)
    for given in (config, assets_dir):
        if isinstance(given, (str, Path)):
            note_input(given)
    layout = layout or detect_layout(folder)
    if layout == "hf":
        hf_config = config if config is not None else _assets_config(assets_dir)
        reader = FP8Source if is_fp8_folder(folder, hf_config) else HFSource  # FP8: dequantized on read
        return reader(folder, config=hf_config, skeleton=skeleton, experts_layout=experts_layout)
    if layout == "dcp":
        return DCPSource(folder, config=config, skeleton=skeleton, assets_dir=assets_dir, prefix=prefix)
    if layout == "torch_dist" or layout == "megatron" and find_torch_dist_dir(folder) is not None:
        return TorchDistSource(folder, config=config, skeleton=skeleton, assets_dir=assets_dir)
    if layout == "megatron":
        return MegatronSource(folder, config=config, skeleton=skeleton, assets_dir=assets_dir)
    if layout == "verl":
        return VerlSource(folder, config=config, skeleton=skeleton, assets_dir=assets_dir)
    raise UserError(f"'{path}' holds no safetensors, DCP (.metadata) or Megatron (mp_rank_*) checkpoint")


def _assets_config(assets_dir: str | Path | None) -> Path | None:
    if assets_dir is not None and (Path(assets_dir) / "config.json").is_file():
        return Path(assets_dir) / "config.json"
    return None
