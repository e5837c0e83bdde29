"""Worker run under torchrun (CPU, gloo) by tests/test_dcp.py.

``load MODEL_DIR DCP_DIR OUT``: build the model on the meta device, shard it with FSDP2, materialise
it empty, fill it with ``dcp.load`` from DCP_DIR, run a forward pass and save rank 0's logits to OUT.

``save MODEL_DIR DCP_DIR``: load the HF model, upcast to fp32 master weights, wrap layers with
activation checkpointing, shard with FSDP2, take one optimizer step with a zero learning rate (so
the weights stay equal to the HF ones while optimizer state exists) and save
``{"model": model.state_dict(), "optimizer": ...}`` as a training job would.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.fsdp import fully_shard
from transformers import AutoConfig, AutoModelForImageTextToText


def input_ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, min(vocab, 2000), (2, 9), generator=torch.Generator().manual_seed(7))


def shard(model) -> None:
    for layer in model.model.language_model.layers:
        fully_shard(layer)
    for block in model.model.visual.blocks:
        fully_shard(block)
    fully_shard(model)


def load(model_dir: str, dcp_dir: str, out: str) -> None:
    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    shard(model)
    model.to_empty(device="cpu")
    state = model.state_dict()
    dcp.load(state, checkpoint_id=dcp_dir)
    restore_buffers(model, config)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=input_ids(config.text_config.vocab_size)).logits
    if dist.get_rank() == 0:
        torch.save(logits.float(), out)


def restore_buffers(model, config) -> None:
    """Non-persistent buffers (rotary ``inv_freq``) are not in any checkpoint: recompute them, as a
    training job does after ``to_empty``, from a model built on the CPU from the same config."""
    reference = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    buffers = dict(reference.named_buffers())
    for name, buf in model.named_buffers():
        buf.copy_(buffers[name])


def save(model_dir: str, dcp_dir: str) -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    layers = model.model.language_model.layers
    for i in range(len(layers)):
        layers[i] = checkpoint_wrapper(layers[i])
    for layer in layers:
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)
    loss = model(input_ids=input_ids(model.config.text_config.vocab_size)).logits.float().pow(2).mean()
    loss.backward()
    optimizer.step()
    # a torch.compile wrapper's raw state dict carries the "_orig_mod." prefix users meet in practice
    state = {"model": torch.compile(model).state_dict(), "optimizer": get_optimizer_state_dict(model, optimizer)}
    dcp.save(state, checkpoint_id=dcp_dir)


if __name__ == "__main__":
    dist.init_process_group("gloo")
    try:
        if sys.argv[1] == "load":
            load(*sys.argv[2:5])
        else:
            save(*sys.argv[2:4])
        # every rank finishes its work before any tears gloo down: a rank that destroys the group while
        # another is still busy can abort ("terminate called without an active exception")
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # leave without interpreter finalization: a gloo worker thread still releasing the last collective's
    # tensors needs the GIL, and finalization makes it abort the rank (see vlconvert.cli._leave_rank)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
