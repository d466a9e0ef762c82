"""Turn a dataset sample into the transformer's training inputs, with the pipelines' own conditioning code.

What a model needs is read from its transformer: the family registry
(:func:`diffusers_wan_ext.families.training_conditioning`) gives its :class:`~diffusers_wan_ext.families.Conditioning`
-- the pipeline whose conditioning code is reused, the ``--extra_inputs`` it requires / accepts and the function
that fills the conditioning fields (e.g. Fun: the pipeline's ``prepare_condition`` + CLIP; VACE: stock
``WanVACEPipeline``'s control encoding; TI2V: the clean first frame).  Each family declares its own in its module.

Example:
    >>> builder = WanInputBuilder(components, extra_inputs=["control_video"], device="cuda")  # doctest: +SKIP
    >>> inputs = builder(sample)  # doctest: +SKIP
    >>> inputs.latents.shape, inputs.y.shape  # doctest: +SKIP
    (torch.Size([1, 16, 21, 60, 104]), torch.Size([1, 32, 21, 60, 104]))
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import PIL.Image
import torch

from ..utils.media import encode_video, load_image, load_video_frames
from ..families import Conditioning, training_conditioning, training_declarations
from .components import WanTrainingComponents
from .dataset import DatasetRowError, crop_and_resize

__all__ = ["ModelInputs", "WanInputBuilder", "conditioning_for"]

#: The families' extra trainable components (each driven by one ``--extra_inputs`` column).
EXTRA_COMPONENTS = training_declarations()[1]
#: Their input columns: cache entries hold them under these names.
COMPONENT_INPUTS = tuple(c.input_name for c in EXTRA_COMPONENTS)


@dataclass
class ModelInputs:
    """Everything the loss needs besides noise and timestep (all batch 1).

    Attributes:
        latents: clean latents ``x0`` ``[1, z, T, h, w]`` (VACE: reference latents prepended on ``T``).
        prompt_embeds: umT5 context ``[1, L, text_dim]``.
        y: conditioning latents concatenated to the noisy latents on channels (I2V / Fun), or ``None``.
        image_embeds: CLIP features (models with a CLIP branch), or ``None``.
        first_frame_latents: TI2V-5B with ``input_image``: the clean latent frame 0 (kept clean, timestep 0, not in
            the loss), or ``None``.
        clean_frames: leading latent frames that are clean conditioning (LongCat-Video continuation): kept clean in
            the transformer input and left out of the loss (the transformer is told through its own kwargs).
        component_inputs: the inputs of the families' extra components by column name (speed control:
            ``motion_bucket_id`` ``[1]``).
        transformer_kwargs: extra transformer inputs (``reference_latents``, ``control_camera_latents``,
            ``control_hidden_states``).
        joint_latents: clean latents denoised together with the video at the same timestep, by name (MOVA:
            ``audio``); noised and in the loss as the video latents (a component's ``joint_forward`` predicts them).
        prompt: the prompt (for logs and the cache).
    """

    latents: torch.Tensor
    prompt_embeds: torch.Tensor
    y: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None
    first_frame_latents: torch.Tensor | None = None
    clean_frames: int = 0
    component_inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    transformer_kwargs: dict[str, torch.Tensor] = field(default_factory=dict)
    joint_latents: dict[str, torch.Tensor] = field(default_factory=dict)
    prompt: str = ""

    _FIELDS = ("latents", "prompt_embeds", "y", "image_embeds", "first_frame_latents")

    def to(self, device: torch.device | str) -> "ModelInputs":
        moved = {name: (None if getattr(self, name) is None else getattr(self, name).to(device)) for name in self._FIELDS}
        components = {k: v.to(device) for k, v in self.component_inputs.items()}
        kwargs = {k: v.to(device) for k, v in self.transformer_kwargs.items()}
        joint = {k: v.to(device) for k, v in self.joint_latents.items()}
        return ModelInputs(**moved, clean_frames=self.clean_frames, component_inputs=components,
                           transformer_kwargs=kwargs, joint_latents=joint, prompt=self.prompt)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Flat CPU tensors for the cache (component inputs under their column name, ``kwargs.<name>`` for the
        transformer kwargs)."""
        out = {name: getattr(self, name) for name in self._FIELDS if getattr(self, name) is not None}
        if self.clean_frames:
            out["clean_frames"] = torch.tensor(int(self.clean_frames))
        out.update(self.component_inputs)
        out.update({f"kwargs.{k}": v for k, v in self.transformer_kwargs.items()})
        out.update({f"joint.{k}": v for k, v in self.joint_latents.items()})
        return {k: v.detach().to("cpu").contiguous() for k, v in out.items()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prompt: str = "") -> "ModelInputs":
        known = (*cls._FIELDS, "clean_frames", *COMPONENT_INPUTS)
        unknown = [k for k in tensors if k not in known and not k.startswith(("kwargs.", "joint."))]
        if unknown or "latents" not in tensors or "prompt_embeds" not in tensors:
            raise ValueError(f"not a training-cache entry: unknown {unknown}, keys {sorted(tensors)}")
        kwargs = {k[len("kwargs."):]: v for k, v in tensors.items() if k.startswith("kwargs.")}
        components = {k: v for k, v in tensors.items() if k in COMPONENT_INPUTS}
        clean = int(tensors["clean_frames"]) if "clean_frames" in tensors else 0
        joint = {k[len("joint."):]: v for k, v in tensors.items() if k.startswith("joint.")}
        return cls(**{k: tensors.get(k) for k in cls._FIELDS}, clean_frames=clean, component_inputs=components,
                   transformer_kwargs=kwargs, joint_latents=joint, prompt=prompt)


def conditioning_for(components: WanTrainingComponents) -> Conditioning:
    """The conditioning of the trained transformer (read from its config by the family registry)."""
    return training_conditioning(components.transformer.config, components.expand_timesteps)


# --------------------------------------------------------------------------------------------------------- builder


class WanInputBuilder:
    r"""
    Encodes dataset samples (``VideoDataset`` items) into :class:`ModelInputs` with frozen VAE / umT5 / CLIP.

    Args:
        components: the loaded components (encoders on ``device``).
        extra_inputs: the ``--extra_inputs`` names; checked against what the model takes.
        device: where encoding runs.
        max_sequence_length (`int`, defaults to 512): umT5 context length.
    """

    def __init__(
        self,
        components: WanTrainingComponents,
        extra_inputs: list[str] | tuple[str, ...] = (),
        device: torch.device | str = "cpu",
        max_sequence_length: int = 512,
    ) -> None:
        self.components = components
        self.conditioning = conditioning_for(components)
        self.extra_inputs = list(extra_inputs)
        self.device = torch.device(device)
        self.max_sequence_length = int(max_sequence_length)
        cond = self.conditioning
        missing = [n for n in cond.required if n not in self.extra_inputs]
        accepted = set(cond.required) | set(cond.optional)
        accepted |= {c.input_name for c in EXTRA_COMPONENTS if components.extra_components.get(c.name) is not None}
        unused = [n for n in self.extra_inputs if n not in accepted]
        if missing or unused:
            problems = []
            if missing:
                problems.append(f"needs --extra_inputs {','.join(cond.required)} (missing {', '.join(missing)})")
            if unused:
                problems.append(f"does not take {', '.join(unused)} (it takes: {', '.join(sorted(accepted)) or 'none'})")
            raise ValueError(f"this model is {cond.name} ({components.pipeline_class}): " + "; ".join(problems))
        for spec in EXTRA_COMPONENTS:  # a column the conditioning takes itself needs no component
            if (spec.input_name in self.extra_inputs and spec.input_name not in cond.required + cond.optional
                    and components.extra_components.get(spec.name) is None):
                raise ValueError(spec.missing or f"--extra_inputs {spec.input_name} needs the {spec.name} component")
        for spec in EXTRA_COMPONENTS:  # a model that denoises other latents with the video cannot train without them
            if (spec.joint_forward is not None and components.extra_components.get(spec.name) is not None
                    and spec.input_name not in self.extra_inputs):
                raise ValueError(f"this model denoises its {spec.name} latents together with the video: pass "
                                 f"--extra_inputs {spec.input_name} (training the video alone is not its objective)")
        for name in ("vae", "text_encoder", "tokenizer"):
            if getattr(components, name) is None:
                raise ValueError(f"the model folder has no {name}; encoding training inputs needs it")
        pipeline_cls = cond.pipeline
        params = inspect.signature(pipeline_cls.__init__).parameters
        if components.audio_encoder is not None:  # frozen, used for conditioning only
            components.audio_encoder.requires_grad_(False).eval().to(self.device)
        parts = dict(tokenizer=components.tokenizer, text_encoder=components.text_encoder, vae=components.vae,
                     scheduler=None, image_encoder=components.image_encoder, transformer=components.transformer,
                     image_processor=components.image_processor, audio_encoder=components.audio_encoder,
                     audio_processor=components.audio_processor)
        self.pipe = pipeline_cls(**{k: v for k, v in parts.items() if k in params})

    # ------------------------------------------------------------------------------------------------ helpers
    @torch.no_grad()
    def encode_prompt(self, prompt: str) -> torch.Tensor:
        # (embeds, negative) for the Wan pipelines, (embeds, mask, negative, negative mask) for LongCat-Video
        embeds = self.pipe.encode_prompt(prompt=prompt, do_classifier_free_guidance=False,
                                         max_sequence_length=self.max_sequence_length, device=self.device)[0]
        if hasattr(self.pipe, "_pad_text_context"):  # Fun / I2V with a CLIP branch: text part padded to text_len
            embeds = self.pipe._pad_text_context(embeds)
        return embeds

    @staticmethod
    def video(sample: dict[str, Any], name: str) -> torch.Tensor:
        """A video column of a sample as ``[1, 3, F, H, W]`` in [-1, 1]."""
        frames = sample[name]
        return load_video_frames(frames.numpy(), frames.shape[0], frames.shape[1], frames.shape[2], name=name)

    @staticmethod
    def video_at(sample: dict[str, Any], name: str, height: int, width: int) -> torch.Tensor:
        """A video column read at its own size (``"video_native"``) as ``[1, 3, F, height, width]`` in [-1, 1]:
        each frame scaled to cover ``height x width`` and center-cropped."""
        frames = [crop_and_resize(PIL.Image.fromarray(f), height, width) for f in sample[name].numpy()]
        return load_video_frames(np.stack([np.asarray(f) for f in frames]), len(frames), height, width, name=name)

    @staticmethod
    def image(sample: dict[str, Any], name: str) -> torch.Tensor:
        """An image column of a sample as ``[1, 3, H, W]`` in [-1, 1]."""
        image = sample[name]
        return load_image(image.numpy(), image.shape[0], image.shape[1], name=name)

    # ------------------------------------------------------------------------------------------------ encoding
    @torch.no_grad()
    def __call__(self, sample: dict[str, Any]) -> ModelInputs:
        """Encode one sample; a conditioning error names the metadata row."""
        try:
            return self._encode(sample)
        except ValueError as e:
            if isinstance(e, DatasetRowError) or "label" not in sample:
                raise
            raise DatasetRowError(f"{sample['label']}: {e}") from e

    def encode_latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalized VAE latents of ``[B, 3, F, H, W]`` pixels in [-1, 1]."""
        return encode_video(self.components.vae, pixels)

    def _encode(self, sample: dict[str, Any]) -> ModelInputs:
        video = self.video(sample, "video")  # [1, 3, F, H, W] in [-1, 1]
        num_frames, height, width = video.shape[2:]
        inputs = ModelInputs(latents=self.encode_latents(video), prompt_embeds=self.encode_prompt(sample["prompt"]),
                             prompt=sample["prompt"])
        if self.conditioning.encode is not None:
            self.conditioning.encode(self, sample, inputs, num_frames, height, width)
        for spec in EXTRA_COMPONENTS:
            component = self.components.extra_components.get(spec.name)
            if spec.input_name in self.extra_inputs and component is not None:
                inputs.component_inputs[spec.input_name] = spec.make_input(sample[spec.input_name]).to(self.device)
                if spec.encode is not None:
                    spec.encode(component, self, sample, inputs)
        return inputs
