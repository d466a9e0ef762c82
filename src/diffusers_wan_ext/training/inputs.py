"""Turn a dataset sample into the transformer's training inputs, with the pipelines' own conditioning code.

What a model needs is read from its transformer, as the pipelines do:

============================  =================================  =====================================================
model                         conditioning code reused           extra inputs (``--extra_inputs``)
============================  =================================  =====================================================
T2V (in = out channels)       stock ``WanPipeline.encode_prompt``  ``motion_bucket_id`` (speed control)
TI2V-5B (``expand_timesteps``)  ``encode_video`` (first frame)     optional ``input_image`` (clean latent frame 0)
I2V / FLF2V / Fun-InP (+20)   ``WanFunInpaintPipeline``          ``input_image`` (+ ``end_image``)
Fun-Control (+32 / +36)       ``WanFunControlPipeline``          ``control_video`` (+ ``input_image``,
                                                                 ``reference_image`` for ``ref_conv`` models)
Fun-Camera (+16 / +20 with    ``WanFunCameraControlPipeline``    ``input_image``, ``camera_control_direction``
``control_adapter``)                                             (+ ``_speed``, ``_origin``)
VACE (``vace_layers``)        stock ``WanVACEPipeline``          ``vace_video``, ``vace_video_mask``,
                                                                 ``vace_reference_image`` (latents prepended)
============================  =================================  =====================================================

Stock Wan I2V checkpoints (``WanImageToVideoPipeline``) use the same conditioning as Fun-InP (mask + VAE of the first
frame, CLIP of the first frame with the references' preprocessing), so they are conditioned by
:class:`~diffusers_wan_ext.WanFunInpaintPipeline`'s ``prepare_condition``.

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

import torch

from ..pipelines.fun_conditioning import encode_video, load_image, load_video_frames
from .components import WanTrainingComponents

__all__ = ["ModelInputs", "WanInputBuilder", "conditioning_for"]


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
        motion_bucket_id: speed control value ``[1]``, or ``None``.
        transformer_kwargs: extra transformer inputs (``reference_latents``, ``control_camera_latents``,
            ``control_hidden_states``).
        prompt: the prompt (for logs and the cache).
    """

    latents: torch.Tensor
    prompt_embeds: torch.Tensor
    y: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None
    first_frame_latents: torch.Tensor | None = None
    motion_bucket_id: torch.Tensor | None = None
    transformer_kwargs: dict[str, torch.Tensor] = field(default_factory=dict)
    prompt: str = ""

    _FIELDS = ("latents", "prompt_embeds", "y", "image_embeds", "first_frame_latents", "motion_bucket_id")

    def to(self, device: torch.device | str) -> "ModelInputs":
        moved = {name: (None if getattr(self, name) is None else getattr(self, name).to(device)) for name in self._FIELDS}
        kwargs = {k: v.to(device) for k, v in self.transformer_kwargs.items()}
        return ModelInputs(**moved, transformer_kwargs=kwargs, prompt=self.prompt)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Flat CPU tensors for the cache (``kwargs.<name>`` for the transformer kwargs)."""
        out = {name: getattr(self, name) for name in self._FIELDS if getattr(self, name) is not None}
        out.update({f"kwargs.{k}": v for k, v in self.transformer_kwargs.items()})
        return {k: v.detach().to("cpu").contiguous() for k, v in out.items()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prompt: str = "") -> "ModelInputs":
        unknown = [k for k in tensors if k not in cls._FIELDS and not k.startswith("kwargs.")]
        if unknown or "latents" not in tensors or "prompt_embeds" not in tensors:
            raise ValueError(f"not a training-cache entry: unknown {unknown}, keys {sorted(tensors)}")
        kwargs = {k[len("kwargs."):]: v for k, v in tensors.items() if k.startswith("kwargs.")}
        return cls(**{k: tensors.get(k) for k in cls._FIELDS}, transformer_kwargs=kwargs, prompt=prompt)


# ---------------------------------------------------------------------------------------------- conditioning table


@dataclass(frozen=True)
class Conditioning:
    """How one model family is conditioned.

    Attributes:
        name: for messages.
        pipeline: dotted name of the pipeline class whose code builds the conditioning.
        required: extra inputs it cannot do without; optional: those it accepts.
    """

    name: str
    pipeline: str
    required: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()


CAMERA_INPUTS = ("camera_control_direction", "camera_control_speed", "camera_control_origin")

T2V = Conditioning("text-to-video", "diffusers.WanPipeline", optional=("motion_bucket_id",))
TI2V = Conditioning("Wan2.2 TI2V (first frame in the latents)", "diffusers.WanPipeline", optional=("input_image",))
VACE = Conditioning("VACE", "diffusers.WanVACEPipeline",
                    optional=("vace_video", "vace_video_mask", "vace_reference_image"))
#: ``(y channels, has a camera control_adapter)`` -> the Fun-family conditioning.
Y_CONDITIONING: dict[tuple[int, bool], Conditioning] = {
    (20, False): Conditioning("image-to-video (I2V / FLF2V / Fun-InP)", "diffusers_wan_ext.WanFunInpaintPipeline",
                              required=("input_image",), optional=("end_image",)),
    (32, False): Conditioning("Wan2.1 Fun-Control", "diffusers_wan_ext.WanFunControlPipeline",
                              required=("control_video",), optional=("input_image", "reference_image")),
    (36, False): Conditioning("Wan2.2 Fun-Control", "diffusers_wan_ext.WanFunControlPipeline",
                              required=("control_video",), optional=("input_image", "reference_image")),
    (16, True): Conditioning("Wan2.1 Fun-Camera", "diffusers_wan_ext.WanFunCameraControlPipeline",
                             required=("input_image", "camera_control_direction"), optional=CAMERA_INPUTS[1:]),
    (20, True): Conditioning("Wan2.2 Fun-Camera", "diffusers_wan_ext.WanFunCameraControlPipeline",
                             required=("input_image", "camera_control_direction"), optional=CAMERA_INPUTS[1:]),
}
#: our extra-input names -> ``prepare_condition`` argument names of the Fun pipelines
FUN_ARGUMENTS = {"input_image": "image", "end_image": "end_image", "control_video": "control_video",
                 "reference_image": "reference_image"}


def conditioning_for(components: WanTrainingComponents) -> Conditioning:
    """The conditioning family of the trained transformer (read from its config, as the pipelines do)."""
    config = components.transformer.config
    if getattr(config, "vace_layers", None):
        return VACE
    if components.expand_timesteps:
        return TI2V
    y_channels = config.in_channels - config.out_channels
    if y_channels == 0:
        return T2V
    key = (y_channels, bool(getattr(config, "control_adapter_in_channels", None)))
    if key not in Y_CONDITIONING:
        raise ValueError(f"the transformer takes {config.in_channels} input channels ({config.out_channels} latents + "
                         f"{y_channels} conditioning channels), a layout no Wan pipeline conditions")
    return Y_CONDITIONING[key]


def _resolve(dotted: str):
    import importlib

    module, name = dotted.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


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
        if components.motion_controller is not None:
            accepted.add("motion_bucket_id")
        unused = [n for n in self.extra_inputs if n not in accepted]
        if missing or unused:
            problems = []
            if missing:
                problems.append(f"needs --extra_inputs {','.join(cond.required)} (missing {', '.join(missing)})")
            if unused:
                problems.append(f"does not take {', '.join(unused)} (it takes: {', '.join(sorted(accepted)) or 'none'})")
            raise ValueError(f"this model is {cond.name} ({components.pipeline_class}): " + "; ".join(problems))
        if "motion_bucket_id" in self.extra_inputs and components.motion_controller is None:
            raise ValueError("--extra_inputs motion_bucket_id needs the speed-control motion_controller component "
                             "(a WanSpeedControlPipeline folder: diffusers-wan add-motion-controller)")
        for name in ("vae", "text_encoder", "tokenizer"):
            if getattr(components, name) is None:
                raise ValueError(f"the model folder has no {name}; encoding training inputs needs it")
        pipeline_cls = _resolve(cond.pipeline)
        params = inspect.signature(pipeline_cls.__init__).parameters
        parts = dict(tokenizer=components.tokenizer, text_encoder=components.text_encoder, vae=components.vae,
                     scheduler=None, image_encoder=components.image_encoder, transformer=components.transformer)
        self.pipe = pipeline_cls(**{k: v for k, v in parts.items() if k in params})

    # ------------------------------------------------------------------------------------------------ helpers
    @torch.no_grad()
    def encode_prompt(self, prompt: str) -> torch.Tensor:
        embeds, _ = self.pipe.encode_prompt(prompt=prompt, do_classifier_free_guidance=False,
                                            max_sequence_length=self.max_sequence_length, device=self.device)
        if hasattr(self.pipe, "_pad_text_context"):  # Fun / I2V with a CLIP branch: text part padded to text_len
            embeds = self.pipe._pad_text_context(embeds)
        return embeds

    @staticmethod
    def _video(sample: dict[str, Any], name: str) -> torch.Tensor:
        frames = sample[name]
        return load_video_frames(frames.numpy(), frames.shape[0], frames.shape[1], frames.shape[2], name=name)

    @staticmethod
    def _image(sample: dict[str, Any], name: str) -> torch.Tensor:
        image = sample[name]
        return load_image(image.numpy(), image.shape[0], image.shape[1], name=name)

    # ------------------------------------------------------------------------------------------------ encoding
    @torch.no_grad()
    def __call__(self, sample: dict[str, Any]) -> ModelInputs:
        """Encode one sample; a conditioning error names the metadata row."""
        try:
            return self._encode(sample)
        except ValueError as e:
            from .dataset import DatasetRowError

            if isinstance(e, DatasetRowError) or "label" not in sample:
                raise
            raise DatasetRowError(f"{sample['label']}: {e}") from e

    def _encode(self, sample: dict[str, Any]) -> ModelInputs:
        video = self._video(sample, "video")  # [1, 3, F, H, W] in [-1, 1]
        num_frames, height, width = video.shape[2:]
        vae = self.components.vae
        latents = encode_video(vae, video)
        inputs = ModelInputs(latents=latents, prompt_embeds=self.encode_prompt(sample["prompt"]),
                             prompt=sample["prompt"])
        cond = self.conditioning
        if cond is TI2V:
            # a one-frame clip (an image) keeps its only frame noisy: pinning it would leave nothing to predict
            if "input_image" in self.extra_inputs and latents.shape[2] > 1:
                image = self._image(sample, "input_image")
                inputs.first_frame_latents = encode_video(vae, image.unsqueeze(2))
        elif cond is VACE:
            self._vace(sample, inputs, num_frames, height, width)
        elif cond is not T2V:
            self._fun(sample, inputs, num_frames, height, width)
        if "motion_bucket_id" in self.extra_inputs:
            inputs.motion_bucket_id = torch.tensor([float(sample["motion_bucket_id"])], device=self.device)
        return inputs

    def _fun(self, sample: dict[str, Any], inputs: ModelInputs, num_frames: int, height: int, width: int) -> None:
        pipe = self.pipe
        accepted = inspect.signature(pipe.prepare_condition).parameters
        kwargs: dict[str, Any] = {}
        for name, arg in FUN_ARGUMENTS.items():
            if name in self.extra_inputs and arg in accepted:
                kwargs[arg] = (self._video if name == "control_video" else self._image)(sample, name)
        if "control_camera_latents" in accepted:
            from ..utils.camera import DEFAULT_CAMERA_SPEED, camera_control_latents

            kwargs["control_camera_latents"] = camera_control_latents(
                num_frames, height, width, direction=sample["camera_control_direction"],
                speed=sample.get("camera_control_speed", DEFAULT_CAMERA_SPEED),
                origin=sample.get("camera_control_origin"),
            )
        condition = pipe.prepare_condition(height=height, width=width, num_frames=num_frames, device=self.device,
                                           **kwargs)
        inputs.y = condition.y
        inputs.transformer_kwargs = {k: v for k, v in condition.transformer_kwargs.items() if v is not None}
        if pipe.has_clip_branch:
            if condition.clip_image is None:
                inputs.image_embeds = pipe._zero_clip_features(self.device)
            else:
                embeds = pipe.encode_clip_image(condition.clip_image, self.device)
                if getattr(pipe.transformer.config, "pos_embed_seq_len", None) and "end_image" in kwargs:
                    # FLF2V: CLIP features of the first and the last frame, concatenated
                    embeds = torch.cat([embeds, pipe.encode_clip_image(kwargs["end_image"], self.device)], dim=1)
                inputs.image_embeds = embeds

    def _vace(self, sample: dict[str, Any], inputs: ModelInputs, num_frames: int, height: int, width: int) -> None:
        pipe = self.pipe
        if "vace_video" in self.extra_inputs:
            control = self._video(sample, "vace_video")
        else:
            control = torch.zeros(1, 3, num_frames, height, width)
        if "vace_video_mask" in self.extra_inputs:
            mask = self._video(sample, "vace_video_mask").add(1).div(2).clamp(0, 1)  # [-1, 1] -> [0, 1]
        else:
            mask = torch.ones(1, 3, num_frames, height, width)
        references = None
        if "vace_reference_image" in self.extra_inputs:
            references = [[self._image(sample, "vace_reference_image")[0].to(self.device)]]
        control, mask = control.to(self.device), mask.to(self.device)
        context = pipe.prepare_video_latents(control, mask, references, device=self.device)
        mask_latents = pipe.prepare_masks(mask, references)
        inputs.transformer_kwargs = {"control_hidden_states": torch.cat([context, mask_latents.to(context)], dim=1)}
        if references is not None:
            # the references' latents come first in time, as in DiffSynth-Studio's training (and stock inference)
            ref = encode_video(self.components.vae, references[0][0][None, :, None])
            inputs.latents = torch.cat([ref.to(inputs.latents), inputs.latents], dim=2)
