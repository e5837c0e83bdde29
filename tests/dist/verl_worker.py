"""Worker run under torchrun (CPU, gloo) by tests/test_verl.py: write a checkpoint as verl's FSDP manager does.

``save MODEL_DIR OUT``: load the HF model in float32 (master weights), shard it with FSDP2 (each decoder
layer, each vision block, then the model), take one optimizer step with a zero learning rate (weights stay
equal to the HF ones while optimizer state exists), and write per rank R of W
``model_world_size_W_rank_R.pt`` (``torch.save(model.state_dict())``: DTensors sharded on dim 0),
``optim_world_size_W_rank_R.pt`` and ``extra_state_world_size_W_rank_R.pt``; rank 0 writes ``huggingface/``.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForImageTextToText


def save(model_dir: str, out: str) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    for layer in model.model.language_model.layers:
        fully_shard(layer)
    for block in model.model.visual.blocks:
        fully_shard(block)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)
    ids = torch.randint(0, 2000, (2, 9), generator=torch.Generator().manual_seed(7))
    model(input_ids=ids).logits.float().pow(2).mean().backward()
    optimizer.step()
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), folder / f"model_world_size_{world}_rank_{rank}.pt")
    torch.save(optimizer.state_dict(), folder / f"optim_world_size_{world}_rank_{rank}.pt")
    extra = {"lr_scheduler": {}, "rng": torch.get_rng_state()}
    torch.save(extra, folder / f"extra_state_world_size_{world}_rank_{rank}.pt")
    if rank == 0:
        hf = folder / "huggingface"
        hf.mkdir(exist_ok=True)
        for p in Path(model_dir).iterdir():
            if p.is_file() and not p.name.endswith((".safetensors", ".index.json")):
                shutil.copyfile(p, hf / p.name)


if __name__ == "__main__":
    dist.init_process_group("gloo")
    try:
        save(*sys.argv[2:4])
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # leave without interpreter finalization: a gloo worker thread still releasing the last collective's
    # tensors needs the GIL, and finalization makes it abort the rank (see vlconvert.cli._leave_rank)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
