"""One ms-swift check per process (ms-swift 4.6.0 with mcore-bridge 1.6.5, megatron-core 0.19.2).

Usage: ``python swift_worker.py JOB ARGS...``; prints one JSON line (``RESULT {...}``) and exits 0 when the check
holds. The model is mcore-bridge's Qwen3-VL ``MultimodalGPTModel`` (``get_mcore_model``) built on the CPU with
the stand-ins of ``swift_env.py``. The reference is always mcore-bridge's own import of the HF fixture
(``config.bridge.load_weights``), never vlconvert; checkpoints are read and written with ms-swift's own
``load_mcore_checkpoint``/``save_mcore_checkpoint``.
"""

from __future__ import annotations

import json
import os
import sys
from argparse import Namespace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import swift_env  # noqa: E402

swift_env.install()


def _result(**data) -> None:
    print("RESULT " + json.dumps(data), flush=True)


def _model(fixture: str, load: bool):
    """mcore-bridge's model for the fixture; ``load``: filled by mcore-bridge's HF import, else all zeros."""
    from mcore_bridge import get_mcore_model

    config = swift_env.model_config(fixture)
    models = get_mcore_model(config)
    if load:
        config.bridge.load_weights(models, fixture)
    else:
        for p in models[0].parameters():
            p.data.zero_()
    return models


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


def _compare(want: dict[str, torch.Tensor], have: dict[str, torch.Tensor]) -> list[str]:
    bad = sorted(set(want) ^ set(have))
    bad += [k for k in want if k in have and (want[k].dtype != have[k].dtype or not torch.equal(want[k], have[k]))]
    return bad


def _args(**kw) -> Namespace:
    """The MegatronArguments fields ms-swift's checkpoint functions read (single process, full fine-tuning)."""
    return Namespace(tensor_model_parallel_size=1, pipeline_model_parallel_size=1, tuner_type="full",
                     finetune=True, no_load_optim=True, no_load_rng=True, no_save_optim=True, no_save_rng=True,
                     use_megatron_fsdp=False, use_distributed_optimizer=False, async_save=False, fp16=False,
                     bf16=True, data_parallel_random_init=False, dist_ckpt_save_pre_mcore_014=False,
                     dist_ckpt_optim_fully_reshardable=False, **kw)


def swift_load(fixture: str, dst: str) -> int:
    """ms-swift's ``load_mcore_checkpoint`` (``--mcore_model DST``) into a zeroed model, and megatron-core's
    ``dist_checkpointing.load`` of the model's sharded_state_dict (content_metadata from the checkpoint) at
    default strictness; both compared with mcore-bridge's HF import, bit for bit."""
    from megatron.core import dist_checkpointing
    from swift.megatron.utils import megatron_lm_utils

    swift_env.init_dist(port=int(os.environ.get("PORT", "29711")))
    swift_env.install_swift()
    want = _weights(_model(fixture, load=True)[0])
    fresh = _model(fixture, load=False)
    iteration = megatron_lm_utils.load_mcore_checkpoint(_args(mcore_model=dst), fresh, load_arg="mcore_model")
    bad = _compare(want, _weights(fresh[0]))

    tracker = Path(dst, "latest_checkpointed_iteration.txt").read_text().strip()
    ckpt = Path(dst, f"iter_{int(tracker):07d}")
    common = dist_checkpointing.load_common_state_dict(str(ckpt))
    plain = _model(fixture, load=False)
    metadata = common.get("content_metadata")
    sharded = plain[0].sharded_state_dict(metadata=dict(metadata) if metadata is not None else None)
    plain[0].load_state_dict(dist_checkpointing.load(sharded, str(ckpt)), strict=False)
    bad_plain = _compare(want, _weights(plain[0]))
    _result(tensors=len(want), mismatched=bad[:10], mismatched_plain=bad_plain[:10], iteration=iteration,
            visual=sum(k.startswith("visual.") for k in want), sharded_keys=len(sharded),
            content_metadata=metadata, checkpoint_version=common.get("checkpoint_version"))
    return 1 if bad or bad_plain or not want else 0


def swift_save(fixture: str, out: str) -> int:
    """ms-swift's ``save_mcore_checkpoint`` (as ``swift export --to_mcore`` calls it, iteration 1) of
    mcore-bridge's HF import: what vlconvert must read."""
    from swift.megatron.utils import megatron_lm_utils

    swift_env.init_dist(port=int(os.environ.get("PORT", "29711")))
    swift_env.install_swift()
    models = _model(fixture, load=True)
    megatron_lm_utils.save_mcore_checkpoint(_args(output_dir=out), models, iteration=1)
    _result(saved=sorted(str(p.relative_to(out)) for p in Path(out).rglob("*") if p.is_file()))
    return 0


JOBS = {"swift-load": swift_load, "swift-save": swift_save}

if __name__ == "__main__":
    code = JOBS[sys.argv[1]](*sys.argv[2:])
    sys.stdout.flush()
    os._exit(code)
