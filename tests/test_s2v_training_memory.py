"""Wan2.2-S2V LoRA training: the audio injection runs inside the gradient-checkpointed region of its block.

Before, the 12 audio cross-attentions of the release ran after the checkpointed blocks, so every one kept its
activations for the backward (AdaLN input, the fp32 LoRA inputs of ``to_q`` / ``to_out``, the fp32 q norm,
attention q and output): 33 GiB at 480x832x81, twice the T2V-14B's activation memory.  These tests check that a
checkpointed step saves nothing of the injection outside the checkpoints and that the loss and the LoRA gradients
are bit-identical with and without checkpointing (and with the checkpointed inputs offloaded).
"""

from __future__ import annotations

import collections

import pytest
import torch

from diffusers_wan_ext.models import WanS2VTransformer3DModel
from diffusers_wan_ext.training.flow_match import FlowMatchTrainingSchedule
from diffusers_wan_ext.training.inputs import ModelInputs
from diffusers_wan_ext.training.modules import (WanTrainingModule, add_lora, enable_gradient_checkpointing,
                                                training_loss)

CONFIG = dict(num_attention_heads=2, attention_head_dim=24, text_dim=32, freq_dim=32, ffn_dim=96, num_layers=2,
              audio_dim=32, audio_num_layers=3, audio_inject_layers=[0, 1], pose_dim=16, motion_frames=9)
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]
FRAMES, SIZE = 2, 8  # target latent frames and latent height / width: 2 * 4 * 4 = 32 video tokens


def _model(checkpointing: str | None) -> WanS2VTransformer3DModel:
    """Tiny S2V model with a random (non-zero) LoRA on every target, including the audio injectors' attention."""
    torch.manual_seed(0)
    model = WanS2VTransformer3DModel(**CONFIG)
    params = add_lora(model, 4, 4, TARGETS)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    if checkpointing is not None:
        enable_gradient_checkpointing(model, offload=checkpointing == "offload")
    return model.train()


def _inputs(drop_motion_frames: bool) -> ModelInputs:
    g = torch.Generator().manual_seed(2)
    r = lambda *size: torch.randn(*size, generator=g)  # noqa: E731
    kwargs = {"audio_embeds": r(1, 3, 32, 4 * FRAMES), "image_latents": r(1, 16, 1, SIZE, SIZE),
              "motion_latents": r(1, 16, 3, SIZE, SIZE), "pose_latents": r(1, 16, FRAMES, SIZE, SIZE),
              "drop_motion_frames": torch.tensor(drop_motion_frames)}
    return ModelInputs(latents=r(1, 16, FRAMES, SIZE, SIZE), prompt_embeds=r(1, 16, 32), transformer_kwargs=kwargs)


def _loss(model: WanS2VTransformer3DModel, drop_motion_frames: bool = True) -> torch.Tensor:
    loss, _ = training_loss(WanTrainingModule(model), _inputs(drop_motion_frames), FlowMatchTrainingSchedule(),
                            torch.Generator().manual_seed(3), torch.float32)
    return loss


@pytest.mark.parametrize("drop_motion_frames", [True, False])
def test_checkpointed_step_is_bit_identical(drop_motion_frames):
    results = {}
    for mode in (None, "checkpoint", "offload"):
        model = _model(mode)
        loss = _loss(model, drop_motion_frames)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results[mode] = (loss.detach(), grads)
    ref_loss, ref_grads = results[None]
    injector = [n for n in ref_grads if n.startswith("audio_injector.")]
    assert injector and all(ref_grads[n].abs().sum() > 0 for n in injector)  # the injection's LoRA is trained
    for mode in ("checkpoint", "offload"):
        loss, grads = results[mode]
        assert torch.equal(loss, ref_loss), mode
        assert grads.keys() == ref_grads.keys()
        for name in grads:
            assert torch.equal(grads[name], ref_grads[name]), (mode, name)


def _saved_outside_checkpoints(model: WanS2VTransformer3DModel) -> tuple[collections.Counter, int]:
    """Bytes the autograd graph saves outside the checkpointed regions of one training forward, by the top-level
    submodule that saved them (``(top)``: the model's own code and the loss), and the largest one tensor's bytes.
    Tensors saved inside a checkpoint go to the checkpoint's own hooks and are not seen here; parameters are skipped.
    """
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    stack, handles = ["(top)"], []
    for name, sub in model.named_modules():
        if name:
            handles.append(sub.register_forward_pre_hook(lambda m, a, n=name: stack.append(n.split(".")[0])))
            handles.append(sub.register_forward_hook(lambda m, a, o: stack.pop() and None))
    seen, by_module, largest = set(), collections.Counter(), 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal largest
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and ptr not in seen:
            seen.add(ptr)
            by_module[stack[-1]] += t.untyped_storage().nbytes()
            largest = max(largest, t.untyped_storage().nbytes())
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            _loss(model)
    finally:
        for handle in handles:
            handle.remove()
    return by_module, largest


def test_audio_injection_saves_nothing_outside_checkpoints():
    # the counter sees the injection when nothing is checkpointed (so the check below can fail)
    plain, _ = _saved_outside_checkpoints(_model(None))
    assert plain["audio_injector"] > 0 and plain["blocks"] > 0
    saved, largest = _saved_outside_checkpoints(_model("checkpoint"))
    assert saved["audio_injector"] == 0 and saved["blocks"] == 0, dict(saved)
    # what stays: the checkpoints' inputs (each block's hidden states, the context, modulation and audio tokens),
    # the stock Wan head's fp32 LayerNorm input (in fp32 a view of the last block's output), the latents and the
    # loss's tensors; no tensor larger than one block's hidden states (video + reference tokens x width x 4 bytes).
    # At this tiny size the small inputs weigh ~3 hidden states; with the injection outside the checkpoints
    # (before the fix) the total was ~15.
    hidden = (FRAMES + 1) * (SIZE // 2) ** 2 * CONFIG["num_attention_heads"] * CONFIG["attention_head_dim"] * 4
    assert largest <= hidden, largest
    assert sum(saved.values()) <= (CONFIG["num_layers"] + 5) * hidden, dict(saved)
