"""The trained module: LoRA (PEFT) or full fine-tuning of a Wan transformer, fp8 storage of frozen weights,
gradient checkpointing, and the forward / loss of one training step.

LoRA goes in with Diffusers' own ``add_adapter`` (a PEFT ``LoraConfig``), so the saved weights are plain Diffusers
PEFT weights that ``WanPipeline.load_lora_weights`` loads.  Frozen linear weights can be stored in
``float8_e4m3fn`` (``--fp8_models transformer``) and are cast to the compute dtype on use.

Example:
    >>> add_lora(transformer, rank=32, alpha=32, target_modules=["to_q", "to_k", "to_v", "to_out.0"])  # doctest: +SKIP
    >>> module = WanTrainingModule(transformer)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import re
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..families import TrainingComponent, training_conditioning, training_declarations
from .flow_match import FlowMatchTrainingSchedule, TimestepSample
from .inputs import ModelInputs

__all__ = [
    "WanTrainingModule",
    "add_lora",
    "enable_gradient_checkpointing",
    "fuse_lora_weights",
    "lora_state_dict",
    "load_lora_into",
    "output_sign",
    "store_frozen_weights_in_fp8",
    "training_component",
    "training_loss",
]

ADAPTER = "default"
FP8 = torch.float8_e4m3fn
#: The families' transformer scopes (``vace_blocks``) and extra trainable components (``motion_controller``).
SCOPES, EXTRA_COMPONENTS, _ = training_declarations()


# ------------------------------------------------------------------------------------------------------------- LoRA


def _lora_target_regex(module: nn.Module, names: list[str], scope: str | None) -> str | list[str]:
    """PEFT ``target_modules``: the suffixes as given, or -- on a transformer with a family scope's blocks
    (``vace_blocks``) -- a regex limited to the scope's blocks (``scope`` names it) or to the main ``blocks``."""
    present = [s for s in SCOPES if hasattr(module, s.blocks)]
    if scope is None or not present:
        return list(names)
    alternatives = "|".join(re.escape(n) for n in names)
    blocks = next((s.blocks for s in present if s.name == scope), "blocks")
    return rf"^{re.escape(blocks)}\.\d+\.(?:.*\.)?(?:{alternatives})$"


def add_lora(
    transformer: nn.Module,
    rank: int,
    alpha: float,
    target_modules: list[str],
    dtype: torch.dtype = torch.float32,
    scope: str | None = None,
) -> list[nn.Parameter]:
    """Add a trainable LoRA adapter (``default``) to ``transformer`` and freeze everything else.

    ``target_modules`` are module-name suffixes in our (Diffusers) layout.  ``scope`` matters for transformers
    with a family scope's blocks (:class:`~diffusers_wan_ext.families.TrainingScope`, e.g. VACE): the scope's name
    limits the LoRA to its blocks (DiffSynth-Studio's ``--lora_base_model vace``), anything else to the main
    ``blocks`` (its ``dit``).  LoRA weights are kept in ``dtype``.  Returns the trainable
    parameters.

    Example:
        >>> from diffusers import WanTransformer3DModel
        >>> t = WanTransformer3DModel(num_attention_heads=2, attention_head_dim=8, text_dim=16, freq_dim=16,
        ...                           ffn_dim=32, num_layers=1)
        >>> params = add_lora(t, rank=4, alpha=4, target_modules=["to_q", "to_out.0"])
        >>> len(params)  # attn1 + attn2, to_q + to_out.0, A + B
        8
    """
    from peft import LoraConfig

    transformer.requires_grad_(False)
    config = LoraConfig(r=int(rank), lora_alpha=float(alpha), init_lora_weights=True,
                        target_modules=_lora_target_regex(transformer, target_modules, scope))
    try:
        transformer.add_adapter(config, adapter_name=ADAPTER)
    except ValueError as e:
        raise ValueError(f"--lora_target_modules {','.join(target_modules)}: {e}. Module names are in the Diffusers "
                         f"layout (to_q, to_k, to_v, to_out.0, add_k_proj, add_v_proj, ffn.net.0.proj, ffn.net.2)"
                         ) from e
    params = []
    for name, p in transformer.named_parameters():
        if "lora_" in name:
            p.data = p.data.to(dtype)
            p.requires_grad_(True)
            params.append(p)
    return params


def lora_state_dict(transformer: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's weights with Diffusers PEFT names (``blocks.0.attn1.to_q.lora_A.weight``), no prefix."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(transformer, adapter_name=ADAPTER)


def lora_metadata(transformer: nn.Module) -> dict[str, Any]:
    """Rank, alpha and targets of the adapter's ``LoraConfig`` (what folding its scale into the factors needs)."""
    config = transformer.peft_config[ADAPTER]
    targets = config.target_modules
    return {"r": int(config.r), "lora_alpha": float(config.lora_alpha),
            "target_modules": targets if isinstance(targets, str) else sorted(targets)}


def load_lora_into(transformer: nn.Module, state_dict: dict[str, torch.Tensor], what: str,
                   scaled: bool = True) -> None:
    """Set the ``default`` adapter from Diffusers-layout LoRA weights (``transformer.`` prefix optional); every key
    must land on the adapter and the shapes must match.

    ``scaled``: the weights mean ``W + B @ A`` (what :mod:`diffusers_wan_ext.lora` returns); ``lora_B`` is divided by
    the adapter's ``lora_alpha / r`` so that the adapter reproduces exactly that.  ``False``: raw factors of an
    adapter with the same rank and alpha.
    """
    from peft.utils import set_peft_model_state_dict

    sd = {k[len("transformer."):] if k.startswith("transformer.") else k: v for k, v in state_dict.items()}
    config = transformer.peft_config[ADAPTER]
    factor = float(config.lora_alpha) / float(config.r)
    if scaled and factor != 1.0:
        sd = {k: v / factor if ".lora_B." in k else v for k, v in sd.items()}
    own = lora_state_dict(transformer)
    unexpected = sorted(set(sd) - set(own))
    missing = sorted(set(own) - set(sd))
    wrong = sorted(k for k in set(sd) & set(own) if tuple(sd[k].shape) != tuple(own[k].shape))
    if unexpected or wrong:
        detail = []
        if unexpected:
            detail.append(f"keys the adapter does not have: {unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}")
        if wrong:
            detail.append(f"shape mismatch (rank?): {wrong[:6]}")
        raise ValueError(f"{what}: " + "; ".join(detail) + ". Pass the same --lora_rank / --lora_target_modules "
                         "the LoRA was trained with")
    if missing:
        raise ValueError(f"{what}: misses {len(missing)} adapter keys (e.g. {missing[:4]}); it was trained with other "
                         f"--lora_target_modules")
    result = set_peft_model_state_dict(transformer, sd, adapter_name=ADAPTER)
    bad = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if bad:
        raise ValueError(f"{what}: PEFT did not load {bad[:4]}")


@torch.no_grad()
def fuse_lora_weights(module: nn.Module, state_dict: dict[str, torch.Tensor], what: str) -> int:
    """Add a LoRA's deltas to ``module``'s weights (``W += B @ A``, ``b += lora_B.bias``), computed in float32:
    ``--preset_lora_path`` (DiffSynth-Studio fuses the preset at scale 1 before adding the trained LoRA).

    ``state_dict``: Diffusers-layout keys without the component prefix meaning ``W + B @ A`` (alpha folded in, what
    :mod:`diffusers_wan_ext.lora` returns).  Returns the number of fused modules; a key that fits no module or shape of
    ``module`` is a ``ValueError`` naming ``what`` and the key (checked before any weight changes).
    """
    updates: list[tuple[torch.Tensor, torch.Tensor]] = []
    for key in sorted(state_dict):
        if key.endswith(".lora_B.weight"):
            continue  # read with its lora_A
        name, sep, role = key.rpartition(".lora_")
        target = module.get_submodule(name) if sep and _has_submodule(module, name) else None
        if target is None or role not in ("A.weight", "B.bias"):
            raise ValueError(f"{what}: {key} fits no module of the {type(module).__name__}")
        if role == "B.bias":
            delta, dst = state_dict[key], target.bias
        else:
            up = state_dict.get(f"{name}.lora_B.weight")
            if up is None:
                raise ValueError(f"{what}: {key} has no {name}.lora_B.weight")
            delta, dst = up.float() @ state_dict[key].float(), target.weight
        if dst is None or tuple(delta.shape) != tuple(dst.shape):
            raise ValueError(f"{what}: {key} does not fit {name} (delta {tuple(delta.shape)}, module "
                             f"{None if dst is None else tuple(dst.shape)}); a LoRA of another model?")
        updates.append((dst, delta))
    for dst, delta in updates:
        dst.copy_((dst.float() + delta.to(dst.device).float()).to(dst.dtype))
    return len({id(dst) for dst, _ in updates})


def _has_submodule(module: nn.Module, name: str) -> bool:
    try:
        module.get_submodule(name)
    except AttributeError:
        return False
    return True


# -------------------------------------------------------------------------------------------------------- fp8 / ckpt


class _CastWeight(nn.Module):
    """Parametrization: the stored (fp8) weight, cast to the compute dtype on every use."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.to(self.dtype)


def store_frozen_weights_in_fp8(module: nn.Module, compute_dtype: torch.dtype) -> int:
    """Store the weights of frozen ``nn.Linear`` layers inside the transformer blocks in ``float8_e4m3fn``; they
    are cast to ``compute_dtype`` on use (gradients still flow to the inputs and to LoRA layers).  Returns the
    number of layers converted.

    Only linears under ``blocks`` and the families' scope blocks (``vace_blocks``) are converted (embedders, norms
    and the head stay as they are, as Diffusers' layerwise casting skips them).
    """
    count = 0
    lists = "|".join(re.escape(b) for b in ("blocks", *(s.blocks for s in SCOPES)))
    for name, sub in module.named_modules():
        if not isinstance(sub, nn.Linear) or "lora_" in name or not re.search(rf"(^|\.)({lists})\.\d+\.", name):
            continue
        if parametrize.is_parametrized(sub, "weight") or sub.weight.requires_grad:
            continue
        sub.weight = nn.Parameter(sub.weight.detach().to(FP8), requires_grad=False)
        parametrize.register_parametrization(sub, "weight", _CastWeight(compute_dtype), unsafe=True)
        count += 1
    return count


def _checkpoint_with_offload(function, *args):
    with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()):
        return torch.utils.checkpoint.checkpoint(function.__call__, *args, use_reentrant=False)


def enable_gradient_checkpointing(transformer: nn.Module, offload: bool = False) -> None:
    """Diffusers' per-block gradient checkpointing; ``offload`` keeps the checkpointed block inputs in CPU memory
    (DiffSynth-Studio's ``--use_gradient_checkpointing_offload``)."""
    transformer.enable_gradient_checkpointing(_checkpoint_with_offload if offload else None)


# ----------------------------------------------------------------------------------------------------- the module


def training_component(name: str) -> TrainingComponent:
    """The family declaration of the extra trainable component ``name``."""
    for spec in EXTRA_COMPONENTS:
        if spec.name == name:
            return spec
    raise ValueError(f"unknown training component {name!r}; the families declare: "
                     f"{', '.join(c.name for c in EXTRA_COMPONENTS) or 'none'}")


class WanTrainingModule(nn.Module):
    r"""
    What ``accelerator.prepare`` wraps: the trained transformer and the extra components a family runs with it
    (:class:`~diffusers_wan_ext.families.TrainingComponent`, each a submodule under its own name, so its weights
    are ``<name>.*``).

    ``forward`` runs one prediction, as the flow-matching velocity (a family whose transformer predicts its
    negative declares ``output_sign = -1``: LongCat-Video); :func:`training_loss` builds its inputs and the loss.

    Args:
        transformer: a Wan transformer (stock ``WanTransformer3DModel``, ``WanVACETransformer3DModel`` or ours).
        components (*optional*): extra components by their declared name.
    """

    def __init__(self, transformer: nn.Module, components: dict[str, nn.Module] | None = None) -> None:
        super().__init__()
        self.transformer = transformer
        self.component_specs = {name: training_component(name) for name in components or {}}
        for name, module in (components or {}).items():
            self.add_module(name, module)
        self.output_sign = output_sign(transformer)
        #: the components' joint forward (denoising ``joint_latents`` with the video: MOVA's audio), if any
        self.joint_forward = next((s.joint_forward for s in self.component_specs.values() if s.joint_forward), None)

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_hidden_states_image: torch.Tensor | None = None,
        component_inputs: dict[str, torch.Tensor] | None = None,
        joint_latents: dict[str, torch.Tensor] | None = None,
        **transformer_kwargs: torch.Tensor,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The prediction; with ``joint_latents`` (noisy), ``(prediction, {name: prediction})`` of the joint
        forward."""
        if joint_latents and self.joint_forward is None:
            raise ValueError(f"joint latents {sorted(joint_latents)} but no component runs a joint forward")
        kwargs = dict(transformer_kwargs)
        if encoder_hidden_states_image is not None:
            kwargs["encoder_hidden_states_image"] = encoder_hidden_states_image
        with contextlib.ExitStack() as stack:
            for name, spec in self.component_specs.items():
                value = (component_inputs or {}).get(spec.input_name)
                if value is not None:
                    stack.enter_context(spec.apply(getattr(self, name), self.transformer, value))
            if joint_latents:
                return self.joint_forward(self, hidden_states, timestep, encoder_hidden_states, joint_latents, **kwargs)
            out = self.transformer(hidden_states, timestep, encoder_hidden_states, return_dict=False, **kwargs)[0]
        return out if self.output_sign == 1.0 else out * self.output_sign


def output_sign(transformer: nn.Module) -> float:
    """``1.0``, or ``-1.0`` for a transformer whose family declares that it predicts the negative velocity."""
    try:
        return float(training_conditioning(transformer.config, False).output_sign)
    except ValueError:  # a layout no family conditions (only reachable when training from a cache)
        return 1.0


def _transformer_kwargs(inputs: ModelInputs, dtype: torch.dtype) -> dict[str, Any]:
    """The transformer kwargs in the compute dtype; 0-dim integer / bool tensors (``num_cond_latents``,
    ``drop_motion_frames``) as Python numbers."""
    out: dict[str, Any] = {}
    for k, v in inputs.transformer_kwargs.items():
        if v.is_floating_point():
            out[k] = v.to(dtype)
        else:
            out[k] = v.item() if v.ndim == 0 else v
    return out


def _per_token_timesteps(t: torch.Tensor, latents: torch.Tensor, patch_size) -> torch.Tensor:
    """Wan2.2 TI2V: timestep 0 for the tokens of latent frame 0, ``t`` elsewhere (``[1, tokens]``)."""
    _, _, frames, h, w = latents.shape
    mask = torch.ones(frames, h // patch_size[1], w // patch_size[2], device=latents.device)
    mask[0] = 0
    return (mask * t).flatten().unsqueeze(0)


def training_loss(
    module: nn.Module,
    inputs: ModelInputs,
    schedule: FlowMatchTrainingSchedule,
    generator: torch.Generator,
    dtype: torch.dtype,
    patch_size: tuple[int, int, int] = (1, 2, 2),
) -> tuple[torch.Tensor, TimestepSample]:
    """One flow-matching loss (DiffSynth-Studio's ``FlowMatchSFTLoss``) for batch-1 ``inputs``.

    The timestep and the noise come from ``generator`` (CPU): timestep first, then ``randn`` of the latents'
    shape.  ``dtype`` is the compute dtype of the transformer inputs (and the rounding of the timestep).
    """
    device = inputs.latents.device
    sample = schedule.sample(generator, timestep_dtype=dtype)
    x0 = inputs.latents.float()
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(device)
    noisy = schedule.add_noise(x0, noise, sample.sigma)
    target = schedule.target(x0, noise)
    t = sample.timestep.to(device)
    if inputs.first_frame_latents is not None:
        noisy[:, :, :1] = inputs.first_frame_latents.float()
        timestep = _per_token_timesteps(t, noisy, patch_size)
    else:
        timestep = t.reshape(1)
    clean = int(inputs.clean_frames)
    if clean:  # clean conditioning frames (the transformer gets their count through its kwargs)
        noisy[:, :, :clean] = x0[:, :, :clean]
    model_input = noisy if inputs.y is None else torch.cat([noisy, inputs.y.float()], dim=1)
    kwargs = _transformer_kwargs(inputs, dtype)
    joint = {}  # latents denoised with the video (MOVA's audio): same timestep, noise drawn after the video's
    for name in sorted(inputs.joint_latents):
        j0 = inputs.joint_latents[name].float()
        j_noise = torch.randn(j0.shape, generator=generator, dtype=torch.float32).to(device)
        joint[name] = (schedule.add_noise(j0, j_noise, sample.sigma), schedule.target(j0, j_noise))
    if joint:
        kwargs["joint_latents"] = {name: noisy_j.to(dtype) for name, (noisy_j, _) in joint.items()}
    prediction = module(
        model_input.to(dtype),
        timestep,
        inputs.prompt_embeds.to(dtype),
        None if inputs.image_embeds is None else inputs.image_embeds.to(dtype),
        component_inputs=inputs.component_inputs or None,
        **kwargs,
    )
    joint_loss = 0.0
    if joint:  # DiffSynth-Studio's FlowMatchSFTAudioVideoLoss: video mse + audio mse, same weight
        prediction, joint_predictions = prediction
        joint_loss = sum(schedule.loss(joint_predictions[name], target_j, sample.weight)
                         for name, (_, target_j) in joint.items())
    if inputs.first_frame_latents is not None:
        prediction, target = prediction[:, :, 1:], target[:, :, 1:]
    if clean:
        prediction, target = prediction[:, :, clean:], target[:, :, clean:]
    return schedule.loss(prediction, target, sample.weight) + joint_loss, sample
