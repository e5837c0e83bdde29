"""The training frameworks a ``torch_dist`` checkpoint can be written for (``convert --for``).

Kept apart from :mod:`vlconvert.layouts.torch_dist` so that the command line can list the choices without
importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from vlconvert.errors import UsageError


@dataclass(frozen=True)
class Consumer:
    """What one training framework's own ``torch_dist`` save of Qwen3-VL looks like (``--for``).

    ``prefix``: the language model's key prefix; ``vision``: ``megatron`` (megatron-core modules, stacked,
    ``vision_model.``), ``hf`` (the HF vision tower kept as a plain module: ``hf_vision_prefix`` + its HF
    name) or None (language model only); ``iteration``: the folder written when ``--iteration`` is not given
    (None = ``release/``); ``args``: a Megatron-LM ``args`` namespace in the common state;
    ``run_config``: Megatron-Bridge's ``run_config.yaml`` and train-state files; ``pad_vocab``: rows padded
    to a multiple of 128 x TP as Megatron-LM does (Bridge builds Qwen3-VL unpadded).
    """

    name: str
    prefix: str
    vision: str | None
    iteration: int | None
    args: bool
    run_config: bool
    pad_vocab: bool
    load: str  # how to load the result there, for the summary
    hf_vision_prefix: str = "visual.visual."

    def iteration_for(self, given: int | None) -> int | None:
        """The iteration folder written: ``--iteration`` when given, else the framework's own (None: release/)."""
        return given if given is not None else self.iteration


CONSUMERS = {
    "megatron-bridge": Consumer("megatron-bridge", "language_model.", "megatron", 0, False, True, False,
                                "AutoBridge.from_hf_pretrained(HF).load_megatron_model(DST), or "
                                "checkpoint.pretrained_checkpoint / checkpoint.load = DST"),
    "megatron-bridge-0.3": Consumer("megatron-bridge-0.3", "language_model.", "hf", 0, False, True, False,
                                    "Megatron-Bridge 0.3 (megatron-core 0.16): as megatron-bridge",
                                    hf_vision_prefix="vision_model."),
    "mbridge": Consumer("mbridge", "language_model.", "megatron", None, False, False, True,
                        "verl: actor.megatron.dist_checkpointing_path=DST/release (use_dist_checkpointing=True); "
                        "dist_checkpointing.load(model.sharded_state_dict(), DST/release)"),
    "ms-swift": Consumer("ms-swift", "language_model.", "hf", 1, True, False, True,
                         "megatron sft --mcore_model DST (or --load DST)"),
    "megatron-lm": Consumer("megatron-lm", "", None, None, True, False, True,
                            "pretrain_gpt.py --load DST --ckpt-format torch_dist (language model only)"),
}
DEFAULT_CONSUMER = "megatron-bridge"


def consumer(name: str | None) -> Consumer:
    """The :class:`Consumer` called ``name`` (None: the default), or one line naming the choices."""
    name = name or DEFAULT_CONSUMER
    if name not in CONSUMERS:
        raise UsageError(f"unknown --for '{name}': use one of {', '.join(CONSUMERS)}")
    return CONSUMERS[name]


