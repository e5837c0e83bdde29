"""One engine: any layout in, any layout out, in one pass — a plan, then a stream.

:class:`Converter` opens the source (:mod:`vlconvert.sources`, layout detected), checks it against the
model skeleton, asks the target (:mod:`vlconvert.targets`, one module per layout) for its plan (plain data:
files, the tensors each holds, and for Megatron each tensor's row map), splits the files over the ranks of
``torchrun``, then streams the plan from the source to the target's writer inside
:func:`vlconvert.publish.staged_output` (overlap checks, one run per output, manifest, ``--resume``). Memory
stays near one tensor (one expert for fused experts). Nothing here names a layout, a model family or a tensor.

    from vlconvert import Converter
    conv = Converter("Qwen3-VL-30B-A3B-Instruct", "mg", to="megatron", tp=2, ep=4)
    print(conv.plan().to_dict()["files"][:3])
    result = conv.run()
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from vlconvert import buffers, hashing, rowbytes, splitting
from vlconvert import workers as workers_mod
from vlconvert.dtypes import DType, as_dtype, element_size, is_torch_dtype, parse_dtype, to_torch
from vlconvert.errors import UsageError, UserError
from vlconvert.layouts.filebytes import FileSpan
from vlconvert.layouts.hf import parse_size
from vlconvert.lazy import is_loaded, torch
from vlconvert.locate import resolve_source
from vlconvert.models.base import EXPERT_LAYOUTS
from vlconvert.models.megatron_table import RankTensor, Src
from vlconvert.plan import (  # noqa: F401 - PlannedFile, ConversionPlan: re-exported, callers import them here
    HASH_PIECES,
    IN_FLIGHT,
    ROW_BLOCK,
    ConversionPlan,
    PlannedFile,
    Result,
    expert_as_bytes,
    rank_tensor_blocks,
    rows_as_bytes,
    rows_per_block,
    source_row_blocks,
)
from vlconvert.progress import progress_bar
from vlconvert.publish import Stage, staged_output
from vlconvert.rowbytes import ByteRows
from vlconvert.sources import Source, open_source, preview
from vlconvert.sources.restore import RestoredSource, restorable
from vlconvert.targets import TARGETS as TARGET_MODULES
from vlconvert.targets import target_named, targets_taking
from vlconvert.targets.dcp import finish_dcp as _finish_dcp  # noqa: F401 - the old name

TARGETS = tuple(TARGET_MODULES)
_RECORD_OVERHEAD = 2048  # bytes a torch.save record adds around the data (measured ~1.5 KB)

# what run(progress=...) takes: a tqdm-like bar (update(n)), or progress(description, total) returning
# advance(n), a tqdm-like bar or a context manager yielding one of these (vlconvert/progress.py)
Progress = Any


# ------------------------------------------------------------------------------------------ plans
# ---------------------------------------------------------------------------------------- options
def resolve_dtype(choice: str | DType | None, source: Source) -> DType | None:
    """The output dtype: ``auto`` = the config's for a DCP (training jobs keep fp32 master weights), else
    the stored one; ``config``; ``keep``; or bf16 / fp16 / fp32."""
    if isinstance(choice, DType) or is_torch_dtype(choice):
        return as_dtype(choice)
    if choice in (None, "keep"):
        return None
    if choice == "auto":
        return source.skeleton.info.dtype if source.dtype_from_config else None
    if choice == "config":
        return source.skeleton.info.dtype
    try:
        return parse_dtype(choice)
    except UserError as exc:
        raise UserError(f"unknown dtype '{choice}': use auto, keep, config, bf16, fp16 or fp32") from exc


ranks_ran = False  # a conversion ran as one rank of torchrun in this process


def _cast(tensor: torch.Tensor, dtype: DType) -> torch.Tensor:
    return tensor if tensor.dtype == dtype else tensor.to(to_torch(dtype))


class Converter:
    """Convert checkpoint ``src`` (HF folder or cached model id, DCP, Megatron) to layout ``to`` in ``dst``.

    Options mirror ``vlconvert convert``: ``dtype`` (auto, keep, config, bf16, fp16, fp32),
    ``assets_dir`` (the original HF folder: config, tokenizer, processor files), ``config``,
    ``experts_layout`` (released / transformers5; for DCP also ``auto`` = the installed transformers'),
    ``prefix`` (DCP: key prefix to write; for a DCP source, ``src_prefix`` forces the one to strip),
    ``max_shard_size`` (HF), ``tied_lm_head`` (DCP), ``allow_missing`` / ``allow_unexpected``, and the
    Megatron sizes ``tp pp ep etp spec experts pp_first_layers pp_last_layers padded_vocab_size
    make_vocab_size_divisible_by iteration``. ``overwrite`` and ``resume`` as on the command line;
    ``merge_lora`` a PEFT adapter folder merged into the weights on the way; ``consumer`` (torch_dist:
    megatron-bridge, mbridge, ms-swift or megatron-lm) the framework whose own save the output matches.
    ``max_memory`` (bytes or a size such as ``"1GiB"``): the peak resident memory to stay under (see
    :meth:`memory_plan`), per process. ``workers``: processes forked to write the output's bytes together
    (``"auto"``: :func:`~vlconvert.workers.auto_workers`; the command line's default); 1 by default here, since
    a library caller's process may run threads of its own, which a fork does not take along.
    """

    def __init__(self, src: str | Path, dst: str | Path, *, to: str, dtype: str | DType | None = "auto",
                 assets_dir: str | Path | None = None, config: str | Path | None = None,
                 experts_layout: str | None = None, prefix: str = "", src_prefix: str | None = None,
                 max_shard_size: str | int = "5GB", tied_lm_head: bool = True, allow_missing: bool = False,
                 allow_unexpected: bool = False, tp: int = 1, pp: int = 1, ep: int = 1, etp: int | None = None,
                 spec: str | None = None, experts: str | None = None, pp_first_layers: int | None = None,
                 pp_last_layers: int | None = None, padded_vocab_size: int | None = None,
                 make_vocab_size_divisible_by: int = 128, iteration: int | None = None,
                 overwrite: bool = False, resume: bool = False, metadata: bool = True,
                 source_layout: str | None = None, merge_lora: str | Path | None = None,
                 max_memory: str | int | None = None, consumer: str | None = None, workers: str | int = 1,
                 info: Callable[[str], None] = lambda s: None):
        target = target_named(to)
        if iteration is not None and iteration < 0:
            raise UsageError(f"--iteration {iteration} is negative: give the training step (0 or more), or leave it "
                            "out to write release/")
        # options that shape one target only: a value other than the default for another target is refused
        # (a usage error), never ignored (issue 22 item 7); dtype, merge_lora, max_memory... apply everywhere
        given = {"tp": (tp, 1), "pp": (pp, 1), "ep": (ep, 1), "etp": (etp, None), "spec": (spec, None),
                 "experts": (experts, None), "pp_first_layers": (pp_first_layers, None),
                 "pp_last_layers": (pp_last_layers, None), "padded_vocab_size": (padded_vocab_size, None),
                 "make_vocab_size_divisible_by": (make_vocab_size_divisible_by, 128), "iteration": (iteration, None),
                 "prefix": (prefix, ""), "tied_lm_head": (tied_lm_head, True),
                 "max_shard_size": (max_shard_size, "5GB"), "allow_missing": (allow_missing, False),
                 "experts_layout": (experts_layout, None)}
        for key, (value, default) in given.items():
            targets = targets_taking(key)
            if key not in target.options and value != default and not (key == "experts_layout" and value == "auto"):
                flag = "--no-tied-lm-head" if key == "tied_lm_head" else "--" + key.replace("_", "-")
                shown = flag if isinstance(value, bool) else f"{flag} {value}"
                raise UsageError(f"{shown} applies to --to {' and '.join(targets)} only, not --to {to}: drop it")
        self.src, self.dst, self.to, self.target = src, Path(dst), to, target
        self.options = dict(dtype=dtype, experts_layout=experts_layout, prefix=prefix, src_prefix=src_prefix,
                            max_shard_size=max_shard_size, tied_lm_head=tied_lm_head, allow_missing=allow_missing,
                            allow_unexpected=allow_unexpected, tp=tp, pp=pp, ep=ep, etp=etp, spec=spec,
                            experts=experts, pp_first_layers=pp_first_layers, pp_last_layers=pp_last_layers,
                            padded_vocab_size=padded_vocab_size,
                            make_vocab_size_divisible_by=make_vocab_size_divisible_by, iteration=iteration,
                            metadata=metadata, merge_lora=merge_lora, consumer=consumer)
        if consumer is not None:
            from vlconvert.layouts.consumers import consumer as _known_consumer

            _known_consumer(consumer)
            if "consumer" not in target.options:
                raise UsageError(f"--for {consumer} applies to --to {' and '.join(targets_taking('consumer'))} (the "
                                f"format those frameworks load); drop it for --to {to}")
        self.assets_dir, self.config = assets_dir, config
        self.overwrite, self.resume, self.info = overwrite, resume, info
        self.max_memory = _memory_budget(max_memory)  # not an option of the output: --resume ignores it
        self.workers = workers_mod.parse_workers(workers)  # None: auto; not an option of the output either
        self.block_bytes = ROW_BLOCK
        self.source_layout = source_layout  # the older spellings (hf-to-dcp, ...) name the layout they read
        self._source: Source | None = None
        self._plan: ConversionPlan | None = None
        self._world, self._lead = 1, True  # under torchrun: the number of ranks, and whether this is rank 0
        self._mine: Callable[[str], bool] = lambda name: True  # the output files this rank writes
        self.assets: Path | None = None

    # -------------------------------------------------------------------------------- open + plan
    @property
    def source(self) -> Source:
        """The opened source (layout detected from its files)."""
        if self._source is None:
            if self.assets_dir is not None:
                try:
                    self.assets = resolve_source(self.assets_dir)
                except UserError as exc:
                    raise UsageError(f"--assets-dir '{self.assets_dir}' does not exist "
                                    "(nor is it a model id in the local Hugging Face cache)") from exc
                if not (self.assets / "config.json").is_file():
                    raise UserError(f"--assets-dir '{self.assets_dir}' has no config.json: give the original "
                                    "Hugging Face folder")
            self._source = open_source(self.src, config=self.config, assets_dir=self.assets,
                                       prefix=self.options["src_prefix"], layout=self.source_layout)
            if self._source.skeleton is None:
                raise UserError(f"'{self.src}' has no config.json: pass --config or --assets-dir")
            if self.assets is None and getattr(self._source, "assets", None) is not None:
                self.assets = self._source.assets  # a verl checkpoint's huggingface/ folder
            restore = restorable(self._source, self.assets)
            if restore:  # tensors transformers drops (Qwen3.5's mtp.*), put back from the original folder
                self._source = RestoredSource(self._source, self.assets, restore)
            if self.options["merge_lora"]:  # a PEFT adapter merged on read (vlconvert.sources.lora)
                from vlconvert.sources.lora import LoRAMergedSource

                self._source = LoRAMergedSource(self._source, self.options["merge_lora"])
        return self._source

    def plan(self) -> ConversionPlan:
        """Check the source against the model and plan every output file, reading no weights."""
        if self._plan is None:
            source = self.source
            dtype = resolve_dtype(self.options["dtype"], source)
            missing = self._check(source)
            self._plan = self.target.plan(self, source, dtype)
            self._plan.missing = missing
            self._plan.notes = list(source.notes) + self._plan.notes
        return self._plan

    def _check(self, source: Source) -> list[str]:
        """Refuse sources that do not fit the model (missing, unexpected tensors, wrong shapes)."""
        sk = source.skeleton
        output = sk.family.output
        names = source.names()
        different = self._different_model(source, names)
        if different:
            raise UserError(different)
        if not names:
            raise UserError(f"'{self.src}' holds no tensor of a {sk.info.family} model with this config: "
                            "check --assets-dir or pass --prefix")
        if not sk.info.tied and output not in names:
            raise UserError(f"'{self.src}' has no {output} but config.json says the embeddings are untied: "
                            "an untied model needs its own lm_head")
        held = set(names)
        missing = [k for k in sk.hf_keys() if k not in held]
        if missing and not (self.options["allow_missing"] and self.target.allows_missing):
            hint = ("pass --allow-missing to write a partial checkpoint anyway" if self.target.allows_missing
                    else f"a {self.to} checkpoint needs every tensor")
            raise UserError(f"'{self.src}' lacks {len(missing)} tensors the model needs ({preview(missing)}); {hint}")
        extra = [n for n in source.extra_names() if not (n == output and sk.info.tied)]
        if extra and not self.options["allow_unexpected"]:
            raise UserError(f"'{self.src}' holds {len(extra)} tensors the model does not have ({preview(extra)}): "
                            "do the weights and config.json belong together? (--allow-unexpected drops them)")
        for name in names:
            shape = tuple(source.spec(name)[0])
            want = sk.shape_in(name, "released")
            if shape != want:
                raise UserError(f"'{name}' has shape {list(shape)} in '{self.src}' but config.json implies "
                                f"{list(want)}")
        return missing

    def _different_model(self, source: Source, names: list[str]) -> str | None:
        """Part of :meth:`_check`: one line when the weights and the config describe different models
        (dense vs MoE, expert count, hidden or vision width, decoder layers), before any tensor-level
        complaint (a missing tensor's --allow-missing hint would send the user the wrong way)."""
        import re

        info = source.skeleton.info
        family = source.skeleton.family

        def shape(name: str) -> tuple[int, ...] | None:
            try:
                return tuple(source.spec(name)[0])
            except Exception:  # noqa: BLE001 - a reader that cannot describe a foreign tensor
                return None

        held = list(names) + [n for n in source.extra_names() if isinstance(n, str)]
        weights: dict[str, object] = {}
        routers = [n for n in held if re.search(r"layers\.\d+\.mlp\.(gate\.weight|router\.weight)$", n)
                   and "vis" not in n]
        dense_mlp = [n for n in held if re.search(r"layers\.\d+\.mlp\.(gate_proj|up_proj|down_proj)\.weight$", n)
                     and "vis" not in n]
        if routers or any(".mlp.experts." in n and "vis" not in n for n in held):
            weights["model"] = "MoE"
            counts = [s[0] for s in (shape(n) for n in routers) if s]
            if counts:
                weights["experts"] = counts[0]
        elif dense_mlp:
            weights["model"] = "dense"
        if family.embed in names and (s := shape(family.embed)) and len(s) == 2:
            weights["hidden size"] = s[1]
        patch = family.vision_patch
        if patch is not None and patch in names and (s := shape(patch)):
            weights["vision width"] = s[0]
        layers = {int(m.group(1)) for n in held if "vis" not in n
                  for m in [re.search(r"language_model\.(?:decoder\.)?layers\.(\d+)\.", n)] if m}
        layers |= {layer for n in names if (layer := family.layer_of(n)) is not None}
        if layers and layers == set(range(len(layers))):
            weights["decoder layers"] = len(layers)
        config = {"model": "MoE" if info.is_moe else "dense", "experts": info.experts,
                  "hidden size": info.hidden, "vision width": info.vision_hidden, "decoder layers": info.layers}
        differ = [k for k, v in weights.items() if k in config and config[k] != v
                  and not (k == "experts" and weights.get("model") != config["model"])]
        if not differ:
            return None

        def describe(facts: dict) -> str:
            return ", ".join((f"{facts[k]} ({facts['experts']} experts)" if facts[k] == "MoE" and facts.get("experts")
                              else str(facts[k])) if k == "model" else f"{k} {facts[k]}" for k in differ)

        where = (f"--config '{self.config}'" if self.config is not None else
                 f"--assets-dir '{self.assets_dir}'" if self.assets_dir is not None else "its config.json")
        fix = ("give the config (--assets-dir or --config) of the model these weights come from"
               if self.config is not None or self.assets_dir is not None else
               "give the config of the model these weights come from with --config")
        return (f"the weights in '{self.src}' and the config ({where}) are different models: weights "
                f"{describe(weights)}; config {describe(config)}; {fix}")

    def experts_layout(self, default: str) -> str:
        """The fused-expert orientation to write: ``--experts-layout`` (``auto`` = the installed transformers'),
        else ``default``."""
        choice = self.options["experts_layout"] or default
        if choice == "auto":
            return self.source.skeleton.runtime_experts
        if choice not in EXPERT_LAYOUTS:
            raise UserError(f"unknown experts layout '{choice}': use auto, {' or '.join(EXPERT_LAYOUTS)}")
        return choice

    # ------------------------------------------------------------------------ what targets stream
    @property
    def lead(self) -> bool:
        """Whether this process writes the files every rank shares (index, metadata, tracker, assets)."""
        return self._lead

    @property
    def world(self) -> int:
        """The number of processes writing the output (``torchrun`` ranks; 1 otherwise)."""
        return self._world

    def owns(self, name: str) -> bool:
        """Whether this process writes output file ``name`` (every file in a single process)."""
        return self._mine(name)

    def blocks(self, name: str, layout: str, dtype: DType) -> Iterator[torch.Tensor | ByteRows | FileSpan]:
        """Canonical tensor ``name`` of the source as row blocks in ``dtype`` (fused experts in ``layout``)."""
        return canonical_blocks(self.source, name, layout, dtype, self.block_bytes)

    def rank_blocks(self, tensor: RankTensor) -> Iterator[torch.Tensor | ByteRows | FileSpan]:
        """A row-mapped (Megatron) tensor built from the source, as row blocks (the family's value op applied
        where the table names one)."""
        if tensor.value_op is None:
            return rank_tensor_blocks(tensor, self.source, self.block_bytes)
        return _valued_blocks(tensor, self.source)

    # ------------------------------------------------------------------------------------ memory
    def memory_plan(self) -> tuple[int, int]:
        """(row-block bytes, estimated peak resident bytes) for this run.

        The estimate is what the process holds now (imports, metadata, plan) plus :data:`IN_FLIGHT` pieces:
        a piece is a row block (times the tensor-parallel size when row-parallel shards read whole source
        rows), or one expert matrix where experts are the unit, plus :data:`HASH_PIECES` pieces waiting for the
        hashing threads (the bound :meth:`run` gives them, ``hash_queue_bytes``). Under ``max_memory`` the
        largest block of 4 MiB, 1 MiB or 256 KiB that fits is taken; when none fits the run is refused in one
        line before anything is written.
        """
        plan, source = self.plan(), self.source
        expert = 0
        for name in source.names():
            if source.skeleton.family.is_expert(name):
                shape, stored = source.spec(name)
                size = max(element_size(stored), element_size(plan.dtype or stored))
                expert = max(expert, size * math.prod(shape[1:]))
        widen = plan.megatron.tp if plan.megatron is not None else 1
        start_up = resident_bytes()
        choices = (ROW_BLOCK,) if self.max_memory is None else (ROW_BLOCK, 2**20, 2**18)
        for block in choices:
            piece = max(block * widen, expert)
            self.hash_queue_bytes = min(hashing.MAX_QUEUED_BYTES, HASH_PIECES * piece)
            peak = start_up + IN_FLIGHT * piece + self.hash_queue_bytes
            if self.max_memory is None or peak <= self.max_memory:
                return block, peak
        unit = f"one expert matrix is {_mib(expert)}" if expert > 2**18 * widen else \
            f"a row block is {_mib(2**18 * widen)}"
        raise UserError(f"--max-memory {_mib(self.max_memory)} is too small for this conversion: it needs "
                        f"about {_mib(peak)} ({_mib(start_up)} taken at start-up, {IN_FLIGHT} pieces "
                        f"in flight; {unit})")

    # --------------------------------------------------------------------------------------- run
    def fingerprint(self) -> dict:
        """What ``--resume`` must find unchanged: the command, the source, every option, and the identity (size,
        mtime, inode, device) of every file under every input (:meth:`inputs`: SRC, assets, ``--config``, the
        ``--merge-lora`` adapter): a shard or adapter rewritten between the killed run and ``--resume`` is
        refused, never mixed with files made from its old bytes."""
        from vlconvert.publish import input_identities

        plan = self.plan()
        table = repr([(f.name, f.tensors) for f in plan.files])
        return {"target": self.to, "source": str(Path(plan.source).resolve()),
                "assets": str(self.assets.resolve()) if self.assets else None,
                "options": {k: str(v) for k, v in sorted(self.options.items())},
                "plan": hashlib.sha256(table.encode()).hexdigest(),
                "inputs": input_identities(list(self.inputs().values()))}

    def inputs(self) -> dict[str, str | Path | None]:
        """Every input of the run, by the option naming it: the one list the overlap check is given
        (:func:`vlconvert.publish.check_no_overlap` adds what each reaches through symlinks). An option
        that names something the run reads belongs here."""
        source = self.source
        assets = "--assets-dir" if self.assets_dir is not None else "assets folder"  # or verl's huggingface/
        return {"SRC": source.folder, assets: self.assets, "--config": self.config,
                "--merge-lora": self.options["merge_lora"]}

    def run(self, progress: Progress | None = None) -> Result:
        """Write the output (published atomically when complete). ``progress``: a tqdm-like bar (advanced
        by ``update(n_bytes)``; its ``total`` set if unset), or ``progress(description, total_bytes)``
        returning ``advance(n_bytes)``, a tqdm-like bar or a context manager yielding either. Under
        ``torchrun`` (``WORLD_SIZE`` > 1) the files are split by bytes over the ranks: see :meth:`_run_distributed`;
        with more than one worker (:meth:`worker_count`), over forked processes: see :meth:`_run_forked`."""
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            return self._run_distributed(progress)
        workers = self.worker_count()
        if workers > 1:
            return self._run_forked(workers, progress)
        plan = self.plan()
        source = self.source
        self.block_bytes = self.memory_plan()[0]
        hashing.QUEUED_BYTES = self.hash_queue_bytes
        inputs = self.inputs()
        needed = plan.tensor_bytes + sum(_RECORD_OVERHEAD for f in plan.files for _ in f.tensors) + 2**20
        needed += self.target.extra_bytes(self, source)
        bar = progress_bar(progress, f"{source.layout} -> {self.to}", plan.tensor_bytes)
        assets: list[str] = []
        try:
            with staged_output(self.dst, inputs=inputs, overwrite=self.overwrite, resume=self.resume,
                               needed_bytes=needed, fingerprint=self.fingerprint(), info=self.info) as stage, \
                    bar as advance:
                assets = self.target.write(self, stage.path, plan, advance)
                notes = list(stage.notes)
        finally:
            source.close()
            buffers.BUFFERS.clear()  # a library caller keeps no idle blocks after the run
        written = sum(p.stat().st_size for p in self.dst.rglob("*") if p.is_file())
        files = sum(1 for p in self.dst.rglob("*") if p.is_file())
        return Result(self.dst, plan, files, written, plan.notes + notes, assets)

    def _write(self, stage: Path, plan: ConversionPlan, advance: Callable[[int], None]) -> list[str]:
        """This process's share of the output files (all of them in a single process)."""
        return self.target.write(self, stage, plan, advance)

    def worker_count(self) -> int:
        """How many processes this run (or this ``torchrun`` rank) forks: ``workers``; auto: by output size and
        cores, one where ``max_memory`` is set (that budget is per process) and under ``torchrun`` with several
        ranks per node (they already use its cores); with one rank per node, by the node's part of the bytes."""
        if self.workers is not None:
            return self.workers
        ranks = int(os.environ.get("WORLD_SIZE", "1"))
        if self.max_memory is not None or (ranks > 1 and int(os.environ.get("LOCAL_WORLD_SIZE", ranks)) > 1):
            return 1
        plan = self.plan()
        return workers_mod.auto_workers(sum(f.nbytes for f in plan.files) // ranks)

    def _run_forked(self, workers: int, progress: Progress | None) -> Result:
        """``workers`` processes of this one split the output's bytes as ``torchrun``'s ranks do (the same
        :meth:`_run_rank`), forked after the plan, so ``import torch`` and the plan are paid once."""
        group = self._fork(workers, lambda forked: forked)
        try:
            return self._run_rank(progress, group, self.plan())
        finally:
            group.reap()

    def _fork(self, workers: int, group_of: Callable[[workers_mod.ForkedGroup], workers_mod.Group]
              ) -> workers_mod.Group:
        """Fork ``workers - 1`` children and return this process's group (``group_of`` the forked group, plain
        or under ``torchrun``). A child never returns: it reopens the source (a handle shared across a fork
        shares its offset), prints nothing, takes its part of the cores, writes its share and ends."""
        plan = self.plan()
        if not self.target.distributed:
            raise UsageError(f"--to {self.to} is written by one process: drop --workers")
        forked = workers_mod.ForkedGroup(workers)
        group = group_of(forked)
        if forked.rank != 0:
            self._source, self.info = None, lambda s: None
            buffers.BUFFERS.clear()
            forked.child_exit(lambda: self._child(group, plan, max(1, workers_mod.usable_cores() // workers)))
        return group

    def _child(self, group: workers_mod.Group, plan: ConversionPlan, threads: int) -> Result:
        """A forked worker's run: its share of the cores for torch's operators, then its share of the bytes.
        A route that only copies bytes never imports torch; one that does takes ``threads`` at its import."""
        if is_loaded("torch"):
            torch.set_num_threads(threads)
        else:
            os.environ["OMP_NUM_THREADS"] = str(threads)
        return self._run_rank(None, group, plan)

    def _run_distributed(self, progress: Progress | None) -> Result:
        """One rank of ``torchrun``: every rank plans the same output from metadata; the bytes are split over
        the ranks (:func:`~vlconvert.splitting.assign_shares`: whole files, and byte ranges of a file where that
        balances the ranks) and each rank writes its share into the stage rank 0 created (lock, overlap checks,
        staging as in a single process). The ranks then finish the files they share (:mod:`vlconvert.splitting`);
        rank 0 gathers every file's size, sha256 and DCP records, writes the index / ``.metadata`` / tracker
        and the manifest once, and publishes. The output is byte-identical whatever the number of ranks.
        ``--resume`` works here too: rank 0 keeps the journaled files and tells every rank which, so each skips
        the kept files it owns (a killed ``torchrun`` run has journaled rank 0's finished files and, at its
        end, the others'; a file ranks share is journaled once all have finished it)."""
        import torch.distributed as dist

        global ranks_ran
        owned = not dist.is_initialized()
        workers, node = self.worker_count(), None
        if workers > 1:  # --workers under torchrun: each rank forks its workers before joining the ranks
            if not owned:
                raise UsageError(f"--workers {workers} needs to fork before the process group starts, and this "
                                 "process already runs one: use workers=1, or more torchrun ranks")
            ranks = int(os.environ.get("RANK", "0")), int(os.environ["WORLD_SIZE"])
            node = self._fork(workers, lambda forked: workers_mod.NodeGroup(forked, *ranks))
        if owned:
            dist.init_process_group("gloo")
        ranks_ran = True  # the command line then ends the process without finalization (cli._leave_rank)
        try:
            if node is None:
                return self._run_rank(progress, workers_mod.TorchGroup(), self.plan())
            node.join()
            return self._run_rank(progress, node, self.plan())
        finally:
            if node is not None:
                node.node.reap()
            if owned and dist.is_initialized():
                dist.destroy_process_group()

    def _run_rank(self, progress: Progress | None, group: workers_mod.Group, plan: ConversionPlan) -> Result:
        """One process of ``group`` (a ``torchrun`` rank or a ``--workers`` process): its share of the output,
        the exchanges, and, on rank 0, the stage, the journal and the publishing (:meth:`_run_distributed`)."""
        from vlconvert.errors import one_line
        from vlconvert.publish import attached_stage, sync_files

        rank, world = group.rank, group.world
        if not self.target.distributed:
            raise UserError(f"--to {self.to} is written by one process: run it without torchrun")
        source = self.source
        shares: dict = {}
        try:  # each rank is its own process: the budget is per rank, and all stop if one cannot keep it
            self.block_bytes, refused = self.memory_plan()[0], None
            hashing.QUEUED_BYTES = self.hash_queue_bytes
            shares = splitting.assign_shares(plan.files, world)
        except UserError as exc:
            refused = str(exc)
        # every rank must write its share of the same files: a node with another SRC, other options or another
        # $VLCONVERT_SPLIT_BYTES would leave gaps or overlaps that no checksum catches (each hashes what is there)
        layout = hashlib.sha256(repr(([(f.name, f.tensors) for f in plan.files], shares)).encode()).hexdigest()
        verdicts = group.all_gather((refused, layout))
        if any(v for v, _ in verdicts):
            raise UserError(next(v for v, _ in verdicts if v))
        differ = [r for r, (_, other) in enumerate(verdicts) if other != verdicts[0][1]]
        if differ:
            raise UserError(f"rank {differ[0]} planned another output than rank 0 (another SRC, other options or "
                            f"another {splitting.SPLIT_BYTES_ENV}): every rank must see the same inputs and settings")
        self._world, self._lead = world, rank == 0
        self._mine = lambda name: any(r == rank for r, _, _ in shares.get(name, [(0, 0, None)]))
        split = {name: (start, stop) for name, owners in shares.items() if len(owners) > 1
                 for r, start, stop in owners if r == rank}
        self._splitting = any(len(owners) > 1 for owners in shares.values())
        assets: list[str] = []
        notes: list[str] = []
        try:
            if rank == 0:
                inputs = self.inputs()
                needed = plan.tensor_bytes + sum(_RECORD_OVERHEAD for f in plan.files for _ in f.tensors) + 2**20
                staged = staged_output(self.dst, inputs=inputs, overwrite=self.overwrite, resume=self.resume,
                                       needed_bytes=needed, fingerprint=self.fingerprint(), info=self.info)
                try:
                    stage = staged.__enter__()
                except BaseException as exc:
                    group.broadcast(("error", str(exc), {}))
                    raise
                group.broadcast(("ok", str(stage.path), stage.kept))
                stage.split = split
                failure: BaseException | None = None
                try:
                    shown = group.shown()  # the processes whose bytes this bar counts
                    if len(shown) == world:  # --workers: one bar for all
                        share, title = plan.tensor_bytes, f"{source.layout} -> {self.to} ({world} workers)"
                    else:
                        share = sum((f.nbytes if stop is None else stop) - start for f in plan.files
                                    for r, start, stop in shares.get(f.name, [(0, 0, None)]) if r in shown)
                        who = "rank 0" if len(shown) == 1 else f"processes 0-{len(shown) - 1}"
                        title = f"{source.layout} -> {self.to} ({who} of {world})"
                    error = None
                    with progress_bar(progress, title, share) as bar:
                        advance = group.progress(bar, share)
                        try:
                            assets = self._write(stage.path, plan, advance)
                        except Exception as exc:  # noqa: BLE001 - every rank must reach the gather below
                            error, failure = f"{group.noun} 0: {one_line(exc, 300)}", exc
                        error, gathered, shared = self._meet(stage, error, {}, group)
                    if error:
                        own = failure is not None and error.startswith(f"{group.noun} 0:")
                        raise failure if own else UserError(error)
                    for entries in gathered[1:]:
                        for rel, e in sorted(entries.items()):
                            stage.journal(rel, e["size"], e["sha256"], e["state"])
                    for rel, (size, digest, state) in sorted(shared.items()):
                        stage.journal(rel, size, digest, state)
                    self.target.finish(self, stage.path, plan, stage.entries)
                    notes = list(stage.notes)
                except BaseException as exc:  # noqa: BLE001 - handed to the stage, then re-raised
                    failure = exc
                if failure is not None:
                    group.stop_others()  # no worker writes into the stage while it is removed
                outcome = None
                try:
                    if failure is None:
                        staged.__exit__(None, None, None)
                    else:
                        staged.__exit__(type(failure), failure, failure.__traceback__)
                except BaseException as exc:  # noqa: BLE001 - publishing failed: tell the others
                    failure = exc
                if failure is not None:
                    outcome = str(failure) or type(failure).__name__
                group.broadcast(outcome)
                if failure is not None:
                    raise failure
            else:
                status, where, kept = group.broadcast(None)
                if status != "ok":
                    raise UserError(f"{group.noun} 0 stopped before writing: {where}")
                error, entries = None, {}
                with attached_stage(where, self.dst, kept) as stage:
                    stage.split = split
                    try:
                        advance = group.progress(lambda n: None, 0)
                        self._write(stage.path, plan, advance)
                        # on disk, this node too
                        sync_files(sorted(stage.path / rel for rel in [*stage.entries, *stage.parts]))
                    except Exception as exc:  # noqa: BLE001 - reported to rank 0, which cleans up
                        error = f"{group.noun} {rank}: {one_line(exc, 300)}"
                    self._meet(stage, error, dict(stage.entries), group)
                final = group.broadcast(None)
                if final is not None:
                    raise UserError(f"nothing was published: {final}")
        finally:
            source.close()
            buffers.BUFFERS.clear()
        written = sum(p.stat().st_size for p in self.dst.rglob("*") if p.is_file())
        files = sum(1 for p in self.dst.rglob("*") if p.is_file())
        return Result(self.dst, plan, files, written, plan.notes + notes, assets)


    def _meet(self, stage: Stage, error: str | None, entries: dict,
              group: workers_mod.Group) -> tuple[str | None, list[dict], dict]:
        """Every rank, after writing its share: exchange the first error and the finished files, then finish
        the files ranks share (CRC-32s combined, late bytes written, shared pieces hashed; see
        :mod:`vlconvert.splitting`). Returns the first error of any rank, each rank's finished files, and each
        shared file's (size, digest, state); every rank takes the same steps, so none waits alone."""
        from vlconvert.errors import one_line
        from vlconvert.publish import sync_files

        rank = group.rank

        def exchange(work: Callable[[], Any], error: str | None) -> tuple[str | None, list]:
            value = None
            if error is None:
                try:
                    value = work()
                except Exception as exc:  # noqa: BLE001 - every rank must reach the gather below
                    error = f"{group.noun} {rank}: {one_line(exc, 300)}"
            out = group.all_gather((error, value))
            return next((e for e, _ in out if e), None), [v for _, v in out]

        def report() -> tuple[dict, dict]:
            sync_files([stage.path / rel for rel in sorted(stage.parts)])  # another node may read them back
            return entries, splitting.crc_report(stage.parts)

        error, reports = exchange(report, error)
        if error or not self._splitting:
            return error, [r[0] for r in reports] if not error else [], {}
        error, _ = exchange(lambda: splitting.fill_holes(
            stage.path, stage.parts, splitting.combine_crcs([r[1] for r in reports])), None)
        if error:
            return error, [], {}
        error, pieces = exchange(lambda: splitting.finish_pieces(stage.path, stage.parts), None)
        if error:
            return error, [], {}
        return None, [r[0] for r in reports], splitting.assemble(pieces) if rank == 0 else {}


# ------------------------------------------------------------------------------------------- ops
def canonical_blocks(source: Source, name: str, layout: str, dtype: DType, block: int = ROW_BLOCK
                     ) -> Iterator[torch.Tensor | ByteRows | FileSpan]:
    """A canonical tensor as row blocks of about ``block`` bytes in ``dtype``; fused experts one expert at a time, in
    ``layout`` (released or transformers5). Produced one block at a time; blocks that lie verbatim in a
    source file come as :class:`FileSpan` (the writer copies them file to file)."""
    if source.skeleton.family.is_expert(name):
        for e in range(source.spec(name)[0][0]):
            span = source.expert_span(name, e, layout)
            if span is not None and span.dtype == dtype:
                yield span.reshape((1, *span.shape))
                continue
            matrix = expert_as_bytes(source, name, e, layout, dtype)
            yield matrix.reshape((1, *matrix.shape)) if matrix is not None else \
                _cast(source.expert(name, e, layout), dtype).unsqueeze(0)
        return
    shape = tuple(source.spec(name)[0])
    if not shape:
        scalar = rows_as_bytes(source, Src(name), 0, 1, dtype)
        yield scalar if scalar is not None else _cast(source.rows(Src(name), 0, 1), dtype)
        return
    yield from source_row_blocks(source, Src(name), 0, shape[0], dtype, rows_per_block(shape, dtype, block))


def _valued_blocks(tensor: RankTensor, source: Source) -> Iterator[torch.Tensor | ByteRows]:
    """A (small) tensor with a value op: its rows read whole and mapped by the family (HF -> Megatron); as bytes
    where the rows and the family's op can be (no torch), else with torch."""
    rows = _rank_tensor_bytes(tensor, source)
    valued = None if rows is None else source.skeleton.family.to_megatron_value_bytes(tensor, rows)
    if valued is not None:
        yield valued.reshape(tuple(tensor.shape))
        return
    if tensor.axis == 1:
        src, a, b = tensor.segs[0]
        rows = source.rows(src, 0, tensor.shape[0])[:, a:b]
    else:
        rows = torch.cat([source.rows(src, a, b) for src, a, b in tensor.segs])
    yield source.skeleton.family.to_megatron_value(tensor, rows.to(to_torch(tensor.dtype))).contiguous()


def _rank_tensor_bytes(tensor: RankTensor, source: Source) -> ByteRows | None:
    """A (small) rank tensor's rows in its dtype, put together whole as bytes; None where a piece cannot be."""
    if tensor.axis == 1:
        src, a, b = tensor.segs[0]
        rows = rows_as_bytes(source, src, 0, tensor.shape[0], tensor.dtype)
        return None if rows is None else rowbytes.columns(rows, a, b)
    parts = [rows_as_bytes(source, src, a, b, tensor.dtype) for src, a, b in tensor.segs]
    return None if any(p is None for p in parts) else rowbytes.concat_rows(parts)


def resident_bytes() -> int:
    """Resident memory of this process now (Linux ``/proc``; 0 where unknown)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


def _memory_budget(value: str | int | None) -> int | None:
    if value is None:
        return None
    try:
        budget = parse_size(value)
    except (UserError, ValueError) as exc:
        raise UsageError(f"--max-memory '{value}' is not a size: write e.g. 1GiB or 800MB") from exc
    if budget <= 0:
        raise UsageError(f"--max-memory '{value}' is not a positive size")
    return budget


def convert(src: str | Path, dst: str | Path, *, to: str, progress: Progress | None = None, **options: Any) -> Result:
    """``Converter(src, dst, to=to, **options).run(progress)``."""
    return Converter(src, dst, to=to, **options).run(progress)
