"""``WanAnimateExtPipeline``: stock ``WanAnimatePipeline`` (Wan2.2-Animate-14B) with file inputs, strict validation and
the relighting LoRA.

Stock Diffusers' ``WanAnimatePipeline`` already implements the model the way upstream Wan2.2 does
(``wan/animate.py``): animation mode (the character image follows ``pose_video`` / ``face_video``) and replacement
mode (the character replaces the person of ``background_video`` where ``mask_video`` is white), long videos in
segments of ``segment_frame_length`` frames that continue from the last ``prev_segment_conditioning_frames``
generated frames, reflect-padding of the driving videos to whole segments, CLIP of the reference image, and the
unconditional branch with blanked faces.  This subclass only adds what stock lacks:

* **inputs**: every video may be a path to a video file (e.g. ``src_pose.mp4`` of Wan-Animate's preprocessing), a list
  of PIL images, a numpy array ``[F, H, W, 3]`` or a torch tensor in [-1, 1]; masks may also be ``[F, H, W]`` arrays;
  the image may be a path.  DiffSynth-Studio's name ``inpaint_video`` is accepted for ``background_video``;
* **mode** is inferred (``"replace"`` when a background or mask video is given);
* **clear errors** where stock asserts, pads silently or rounds: a missing pose / face video, driving videos of
  different lengths (stock reflect-pads the shorter one), background / mask without replacement mode, too-short
  videos, ``segment_frame_length`` not ``4n + 1``, a text context that does not fit the transformer's ``text_len``;
* ``max_sequence_length`` defaults to the transformer's ``text_len`` (our
  :class:`~diffusers_wan_ext.WanAnimateExtTransformer3DModel`), 512 for stock;
* :meth:`WanAnimateExtPipeline.load_relighting_lora` -- the release's relighting LoRA (original ``.ckpt`` or a
  converted folder), recommended for replacement mode;
* the runtime options of :class:`~diffusers_wan_ext.pipelines.runtime_options.WanRuntimeOptionsMixin`
  (``set_attention_backend``, ``enable_vram_management``, ``enable_parallelism``; TeaCache is refused: the face blocks
  sit between the DiT blocks and the reference has no coefficients for this model);
* each segment denoises through the shared loop
  (:meth:`~diffusers_wan_ext.pipelines.denoising.WanDenoisingMixin.denoise`): with guidance, the conditional and the
  unconditional (blank face) pass run as one batched forward (``cfg_batching``, default on) or split over ranks (CFG
  parallel).

The call is stock's, step for step (segments, encodings through stock's ``prepare_*`` methods, decoding): with
``cfg_batching=False`` (or without guidance, the default ``guidance_scale=1``) the output is bit-identical to stock's.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import PIL.Image
import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.wan.pipeline_output import WanPipelineOutput
from diffusers.pipelines.wan.pipeline_wan_animate import WanAnimatePipeline
from diffusers.utils import logging
from safetensors.torch import load_file

from ..conversion.animate import DIFFUSERS_LORA_FILE, convert_relighting_lora, find_relighting_lora
from ..utils.shims import ShimPipelineMixin
from ..lora.loader import WanLoraInteropMixin
from ..utils.validation import validate_video_size
from ..utils.media import read_image_file, read_video_file, video_to_tensor
from .denoising import WanDenoisingMixin
from .runtime_options import WanRuntimeOptionsMixin

__all__ = ["WanAnimateExtPipeline", "plan_segments"]

logger = logging.get_logger(__name__)  # pylint: disable=invalid-name

MODES = ("animate", "replace")


def _as_frames(video: Any, name: str) -> list[PIL.Image.Image]:
    """A video input (file path, PIL list, numpy ``[F, H, W, 3]``, torch in [-1, 1]) -> list of RGB PIL images."""
    if isinstance(video, (str, os.PathLike)):
        return read_video_file(video, name)
    if isinstance(video, (list, tuple)) and video and all(isinstance(f, PIL.Image.Image) for f in video):
        return [f.convert("RGB") for f in video]
    t = video_to_tensor(video, name)[0]  # [3, F, H, W] in [-1, 1]
    arr = ((t.permute(1, 2, 3, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    return [PIL.Image.fromarray(a) for a in arr]


def _as_mask_frames(mask: Any, name: str) -> list[PIL.Image.Image]:
    """A mask video (white = generate the character, black = keep the background) -> list of grayscale PIL images.

    Accepts what :func:`_as_frames` accepts plus single-channel arrays ``[F, H, W]`` / ``[F, H, W, 1]`` (bool,
    uint8 0..255 or float 0..1) and torch tensors ``[F, H, W]`` / ``[F, 1, H, W]`` in [0, 1].
    """
    if isinstance(mask, torch.Tensor):
        t = mask.detach().cpu()
        if t.ndim == 4 and t.shape[1] == 1:
            t = t[:, 0]
        if t.ndim == 3:
            mask = t.numpy()
    if isinstance(mask, np.ndarray) and (mask.ndim == 3 or (mask.ndim == 4 and mask.shape[-1] == 1)):
        arr = mask.reshape(mask.shape[:3])
        if arr.dtype == np.bool_:
            arr = arr.astype(np.uint8) * 255
        elif np.issubdtype(arr.dtype, np.floating):
            if arr.size and (arr.min() < 0 or arr.max() > 1):
                raise ValueError(f"{name}: float masks must be in [0, 1] (got {arr.min():.4g}..{arr.max():.4g})")
            arr = np.round(arr * 255).astype(np.uint8)
        elif arr.dtype != np.uint8:
            raise ValueError(f"{name}: masks must be bool, uint8 (0..255) or float (0..1); got dtype {arr.dtype}")
        return [PIL.Image.fromarray(a, mode="L") for a in arr]
    return [f.convert("L") for f in _as_frames(mask, name)]


def _as_image(image: Any, name: str = "image") -> PIL.Image.Image | torch.Tensor:
    if isinstance(image, (str, os.PathLike)):
        return read_image_file(image, name)
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
            raise ValueError(f"{name}: numpy images must be uint8 [H, W, 3]; got {image.dtype} {tuple(image.shape)}")
        return PIL.Image.fromarray(image)
    if isinstance(image, (PIL.Image.Image, torch.Tensor)):
        return image
    raise ValueError(
        f"{name}: unsupported type {type(image).__name__}; pass the character image as a PIL image, a file path, a "
        "uint8 numpy array [H, W, 3] or a torch tensor"
    )


def plan_segments(num_frames: int, segment_frame_length: int, prev_frames: int) -> tuple[int, list[int]]:
    """Stock's segments of a driving video of ``num_frames`` frames: the length it is reflect-padded to (whole
    segments) and the first frame of each segment (each continues from the last ``prev_frames`` of the one before).

    Example:
        >>> plan_segments(9, 5, 1)  # two segments of 5 frames: 0..4 and 4..8
        (9, [0, 4])
    """
    effective = segment_frame_length - prev_frames
    remainder = (num_frames - prev_frames) % effective
    num_target_frames = num_frames + (effective - remainder if remainder else 0)
    return num_target_frames, [i * effective for i in range(num_target_frames // effective)]


class WanAnimateExtPipeline(
    ShimPipelineMixin, WanLoraInteropMixin, WanRuntimeOptionsMixin, WanDenoisingMixin, WanAnimatePipeline
):
    r"""
    Wan2.2-Animate: character animation and replacement -- stock :class:`diffusers.WanAnimatePipeline` plus file /
    array inputs, strict input validation, the relighting LoRA and our runtime options (see the module docstring).

    Components are stock's: ``tokenizer``, ``text_encoder`` (umT5), ``vae`` (Wan2.1 VAE), ``scheduler``,
    ``image_processor`` + ``image_encoder`` (CLIP ViT-H/14), ``transformer``
    (:class:`diffusers.WanAnimateTransformer3DModel` or :class:`~diffusers_wan_ext.WanAnimateExtTransformer3DModel`).
    A folder written by ``diffusers-wan convert`` from the original release (or ``Wan-AI/Wan2.2-Animate-14B-Diffusers``)
    loads with ``WanAnimateExtPipeline.from_pretrained``.

    Example:
        >>> import torch
        >>> from diffusers.utils import export_to_video
        >>> from diffusers_wan_ext import WanAnimateExtPipeline
        >>> pipe = WanAnimateExtPipeline.from_pretrained(  # doctest: +SKIP
        ...     "converted/Wan2.2-Animate-14B", torch_dtype=torch.bfloat16
        ... ).to("cuda")
        >>> # animation: the character of src_ref.png performs the motion of the driving video
        >>> video = pipe(  # doctest: +SKIP
        ...     image="process_results/src_ref.png", pose_video="process_results/src_pose.mp4",
        ...     face_video="process_results/src_face.mp4", prompt="a person dancing", height=720, width=1280,
        ... ).frames[0]
        >>> # replacement: the character replaces the person of the driving video (white mask), relit
        >>> pipe.load_relighting_lora("converted/Wan2.2-Animate-14B")  # doctest: +SKIP
        >>> video = pipe(  # doctest: +SKIP
        ...     image="process_results/src_ref.png", pose_video="process_results/src_pose.mp4",
        ...     face_video="process_results/src_face.mp4", background_video="process_results/src_bg.mp4",
        ...     mask_video="process_results/src_mask.mp4", height=720, width=1280,
        ... ).frames[0]
        >>> export_to_video(video, "replaced.mp4", fps=30)  # doctest: +SKIP
    """

    RELIGHTING_ADAPTER = "relighting"
    #: Classifier-free guidance (blank face in the unconditional pass) through the shared loop: CFG parallel and CFG
    #: batching work.
    supports_cfg_parallel = True
    cfg_batching = True

    # --------------------------------------------------------------------------------------------- relighting
    def load_relighting_lora(
        self, path: str | os.PathLike, adapter_name: str = RELIGHTING_ADAPTER, weight: float = 1.0
    ) -> str:
        """Load Wan2.2-Animate's relighting LoRA into the transformer (upstream uses it with replacement mode).

        Args:
            path: the original ``relighting_lora.ckpt`` (converted on the fly), a converted Diffusers LoRA folder /
                file, or a converted pipeline folder that holds ``relighting_lora/``.
            adapter_name: PEFT adapter name (``set_adapters`` / ``disable_lora`` / ``unload_lora_weights`` use it).
            weight: adapter strength.

        Returns the adapter name.
        """
        p = Path(path)
        if p.is_dir():  # a converted pipeline folder, a converted LoRA folder or an original release folder
            folder = p / "relighting_lora" if (p / "relighting_lora").is_dir() else p
            converted = folder / DIFFUSERS_LORA_FILE
            p = converted if converted.is_file() else (find_relighting_lora(p) or converted)
        if not p.is_file():
            raise ValueError(
                f"no relighting LoRA at {path!r}: pass relighting_lora.ckpt of the Wan2.2-Animate-14B release, a "
                "folder written by `diffusers-wan relighting-lora`, or a converted folder with relighting_lora/"
            )
        sd = load_file(str(p)) if p.suffix == ".safetensors" else None
        if sd is None or not all(k.startswith("transformer.") for k in sd):
            sd = convert_relighting_lora(sd if sd is not None else p)
        self.load_lora_weights(sd, adapter_name=adapter_name)
        if weight != 1.0:
            self.set_adapters(adapter_name, weight)
        return adapter_name

    def enable_teacache(self, *args, **kwargs) -> None:
        """Not available for Wan2.2-Animate: the face blocks run between the DiT blocks (a cached block residual would
        skip them) and no reference TeaCache coefficients exist for this model."""
        raise NotImplementedError(
            "TeaCache is not supported for Wan2.2-Animate (face blocks between the DiT blocks; no reference "
            "coefficients); use set_attention_backend() / enable_vram_management() for speed and memory instead"
        )

    # ----------------------------------------------------------------------------------------------- checks
    def _text_len(self) -> int | None:
        return getattr(self.transformer.config, "text_len", None) if self.transformer is not None else None

    def _validate_and_load(
        self,
        image: Any,
        pose_video: Any,
        face_video: Any,
        background_video: Any,
        mask_video: Any,
        mode: str | None,
        height: int,
        width: int,
        segment_frame_length: int,
        prev_segment_conditioning_frames: int,
    ) -> tuple[Any, list, list, list | None, list | None, str]:
        if image is None:
            raise ValueError(
                "image is required: the reference character image (src_ref.png of Wan-Animate's preprocessing); "
                "image_embeds can replace its CLIP features but not the image itself"
            )
        if pose_video is None:
            raise ValueError(
                "pose_video is required: the driving skeleton video (src_pose.mp4 of Wan-Animate's preprocessing), as "
                "a video file path, a list of PIL images or an array"
            )
        if face_video is None:
            raise ValueError(
                "face_video is required: the driving face crops (src_face.mp4 of Wan-Animate's preprocessing), as a "
                "video file path, a list of PIL images or an array"
            )
        replace_inputs = [n for n, v in (("background_video", background_video), ("mask_video", mask_video)) if v is not None]
        if mode is None:
            mode = "replace" if replace_inputs else "animate"
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}; pass mode='animate' (character animation) or mode='replace' "
                             "(character replacement with background_video and mask_video)")
        if mode == "animate" and replace_inputs:
            raise ValueError(
                f"{' and '.join(replace_inputs)} given with mode='animate', which does not use them: pass "
                "mode='replace' for character replacement, or leave them out"
            )
        if mode == "replace":
            missing = [n for n in ("background_video", "mask_video") if n not in replace_inputs]
            if missing:
                raise ValueError(
                    f"mode='replace' needs {' and '.join(missing)}: the driving video's background (src_bg.mp4) and "
                    "the mask of the person to replace (src_mask.mp4; white = replace, black = keep)"
                )
        for name, value in (("segment_frame_length", segment_frame_length),
                            ("prev_segment_conditioning_frames", prev_segment_conditioning_frames)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer; got {value!r}")
        validate_video_size(height, width, segment_frame_length, spatial_factor=self.vae_scale_factor_spatial,
                            temporal_factor=self.vae_scale_factor_temporal,
                            patch=int(self.transformer.config.patch_size[-1]) if self.transformer is not None else 2)
        if prev_segment_conditioning_frames >= segment_frame_length:
            raise ValueError(
                f"prev_segment_conditioning_frames={prev_segment_conditioning_frames} must be smaller than "
                f"segment_frame_length={segment_frame_length} (each segment continues from that many frames of the "
                "previous one); upstream uses 1 or 5"
            )
        if 2 * prev_segment_conditioning_frames >= segment_frame_length:
            raise ValueError(
                f"prev_segment_conditioning_frames={prev_segment_conditioning_frames} must be less than half of "
                f"segment_frame_length={segment_frame_length}: each segment must add more new frames than it takes "
                "from the previous one (stock's segment count assumes it)"
            )

        image = _as_image(image)
        pose = _as_frames(pose_video, "pose_video")
        face = _as_frames(face_video, "face_video")
        background = _as_frames(background_video, "background_video") if background_video is not None else None
        mask = _as_mask_frames(mask_video, "mask_video") if mask_video is not None else None
        n = len(pose)
        others = [("face_video", face), ("background_video", background), ("mask_video", mask)]
        wrong = [f"{name} has {len(v)}" for name, v in others if v is not None and len(v) != n]
        if wrong:
            raise ValueError(
                f"pose_video has {n} frames but {', '.join(wrong)}: the pose, face (and background / mask) videos come "
                "from the same driving video and must have the same number of frames"
            )
        if n <= prev_segment_conditioning_frames:
            raise ValueError(
                f"pose_video has {n} frame(s); it needs more than prev_segment_conditioning_frames="
                f"{prev_segment_conditioning_frames}"
            )
        return image, pose, face, background, mask, mode

    def _check_text_len(
        self,
        max_sequence_length: int | None,
        prompt_embeds: torch.Tensor | None,
        negative_prompt_embeds: torch.Tensor | None,
    ) -> int:
        """``max_sequence_length`` (default: the transformer's ``text_len``), checked against the transformer and the
        given embeddings."""
        text_len = self._text_len()
        if max_sequence_length is None:
            max_sequence_length = text_len or 512
        elif text_len is not None and max_sequence_length != text_len:
            raise ValueError(
                f"max_sequence_length={max_sequence_length} but the transformer was built for text_len={text_len} "
                f"text tokens: leave max_sequence_length unset (or pass {text_len})"
            )
        for name, emb in (("prompt_embeds", prompt_embeds), ("negative_prompt_embeds", negative_prompt_embeds)):
            if emb is not None and emb.shape[1] != max_sequence_length:
                raise ValueError(
                    f"{name} has {emb.shape[1]} tokens but the transformer splits its context at "
                    f"{max_sequence_length} text tokens: pad / cut the embeddings to {max_sequence_length} tokens "
                    "(the pipeline's encode_prompt does this)"
                )
        return max_sequence_length

    # ------------------------------------------------------------------------------------------- segments
    def _driving_videos(
        self, pose: list, face: list, background: list | None, mask: list | None, num_frames: int, height: int,
        width: int, device: torch.device,
    ) -> dict[str, torch.Tensor | None]:
        """The driving videos reflect-padded to ``num_frames`` and preprocessed as stock does: pose, background and
        mask at the video size, the face crops at the motion encoder's size."""
        face_size = self.transformer.config.motion_encoder_size
        for name, frames, size in (("pose", pose, (width, height)), ("face", face, (face_size, face_size))):
            if frames[0].size != size:
                logger.warning(f"Reshaping {name} video from {frames[0].size} to {size}")

        def preprocess(frames: list, processor, h: int, w: int) -> torch.Tensor:
            frames = self.pad_video_frames(frames, num_frames)
            return processor.preprocess_video(frames, height=h, width=w).to(device, dtype=torch.float32)

        videos = {
            "pose": preprocess(pose, self.video_processor, height, width),
            "face": preprocess(face, self.video_processor, face_size, face_size),
            "background": None,
            "mask": None,
        }
        if background is not None:  # replacement mode (validated: the mask comes with it)
            videos["background"] = preprocess(background, self.video_processor, height, width)
            videos["mask"] = preprocess(mask, self.video_processor_for_mask, height, width)
        return videos

    def _reference_image_inputs(
        self, image: Any, image_embeds: torch.Tensor | None, batch_size: int, height: int, width: int,
        device: torch.device, dtype: torch.dtype,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference (character) image as stock prepares it: its pixels for the VAE (resized to fill the video
        size) and its CLIP features, one row per video."""
        if self.video_processor.get_default_height_width(image) != (height, width):
            logger.warning(f"Reshaping reference image to ({width}, {height})")
        pixels = self.vae_image_processor.preprocess(image, height=height, width=width, resize_mode="fill")
        if image_embeds is None:
            image_embeds = self.encode_image(image, device)
        return pixels.to(device, dtype=torch.float32), image_embeds.repeat(batch_size, 1, 1).to(dtype)

    def _segment_inputs(
        self,
        start: int,
        prev_frames: torch.Tensor | None,
        videos: dict[str, torch.Tensor | None],
        conditioning: dict[str, Any],
        generator: torch.Generator | list[torch.Generator] | None,
    ) -> dict[str, Any]:
        """The :meth:`denoise` inputs of the segment that starts at frame ``start`` (as stock builds them): the
        reference latents (character image + the previous segment's last frames, or the background in replacement
        mode) concatenated on channels, the pose latents, the face crops -- blanked (all pixels -1) in the
        unconditional pass -- and the CLIP features.

        ``conditioning`` holds what all segments share: ``reference_image_latents``, ``image_embeds``, ``mode``,
        ``segment_frame_length``, ``prev_segment_conditioning_frames``, ``motion_encode_batch_size``."""
        c = conditioning
        reference_image_latents = c["reference_image_latents"]
        batch_size, dtype, device = reference_image_latents.shape[0], c["image_embeds"].dtype, videos["pose"].device
        height, width = videos["pose"].shape[-2:]
        end = start + c["segment_frame_length"]

        def segment(name: str) -> torch.Tensor:
            return videos[name][:, :, start:end].expand(batch_size, -1, -1, -1, -1)

        face = segment("face").to(dtype=dtype)
        pose_latents = self.prepare_pose_latents(
            videos["pose"][:, :, start:end], batch_size, generator=generator, device=device
        ).to(dtype=dtype)
        replace = c["mode"] == "replace"
        prev_latents = self.prepare_prev_segment_cond_latents(
            prev_frames[:, :, -c["prev_segment_conditioning_frames"]:].clone().detach() if start > 0 else None,
            background_video=segment("background") if replace else None,
            mask_video=segment("mask") if replace else None,
            batch_size=batch_size,
            segment_frame_length=c["segment_frame_length"],
            start_frame=start,
            height=height,
            width=width,
            prev_segment_cond_frames=c["prev_segment_conditioning_frames"],
            task=c["mode"],
            generator=generator,
            device=device,
        )
        reference_latents = torch.cat([reference_image_latents, prev_latents], dim=2)  # on frames
        return dict(
            model_input=lambda latents: torch.cat([latents, reference_latents], dim=1),  # on channels
            transformer_kwargs=dict(
                encoder_hidden_states_image=c["image_embeds"],
                pose_hidden_states=pose_latents,
                face_pixel_values=face,
                motion_encode_batch_size=c["motion_encode_batch_size"],
            ),
            uncond_transformer_kwargs=dict(face_pixel_values=face * 0 - 1),
        )

    @staticmethod
    def _embeddings_persist(callback: Callable | None, denoise_kwargs: dict[str, Any]) -> Callable | None:
        """The step-end callback, with the prompt embeddings it returns kept for the next segments (as in stock's
        single loop over all segments)."""
        if callback is None:
            return None

        def callback_and_keep(pipe, step_index: int, timestep, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
            outputs = callback(pipe, step_index, timestep, callback_kwargs) or {}
            for name in ("prompt_embeds", "negative_prompt_embeds"):
                if name in outputs:
                    denoise_kwargs[name] = outputs[name]
            return outputs

        return callback_and_keep

    def _decode_segment(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Un-normalized latents and decoded frames of a segment (its latent frame 0, the reference, not decoded)."""
        latents = latents.to(self.vae.dtype)
        z = self.vae.config.z_dim
        mean = torch.tensor(self.vae.config.latents_mean).view(1, z, 1, 1, 1).to(latents.device, latents.dtype)
        inv_std = 1.0 / torch.tensor(self.vae.config.latents_std).view(1, z, 1, 1, 1).to(latents.device, latents.dtype)
        latents = latents / inv_std + mean
        return latents, self.vae.decode(latents[:, :, 1:], return_dict=False)[0]

    # ------------------------------------------------------------------------------------------------- call
    @torch.no_grad()
    def __call__(
        self,
        image: Any = None,
        pose_video: Any = None,
        face_video: Any = None,
        background_video: Any = None,
        mask_video: Any = None,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        height: int = 720,
        width: int = 1280,
        segment_frame_length: int = 77,
        num_inference_steps: int = 20,
        mode: str | None = None,
        prev_segment_conditioning_frames: int = 1,
        motion_encode_batch_size: int | None = None,
        guidance_scale: float = 1.0,
        num_videos_per_prompt: int | None = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        output_type: str | None = "np",
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[[int, int, None], PipelineCallback | MultiPipelineCallbacks] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        max_sequence_length: int | None = None,
        inpaint_video: Any = None,
        cfg_batching: bool | None = None,
        sliding_window_size: int | None = None,
        sliding_window_stride: int | None = None,
    ) -> WanPipelineOutput | tuple:
        r"""
        Generate a video of the character in ``image`` driven by ``pose_video`` / ``face_video``.

        Args:
            image: the reference character image (PIL image, file path, uint8 numpy ``[H, W, 3]`` or tensor).
            pose_video: the driving skeleton video; its length is the output length (generated in segments).
            face_video: the driving face crops (resized to the motion encoder's size, 512 for the release).
            background_video: replacement mode: the driving video's background (``inpaint_video`` is an alias).
            mask_video: replacement mode: white where the character is generated, black where the background stays.
            mode: ``"animate"`` or ``"replace"``; default: ``"replace"`` when a background or mask video is given.
            segment_frame_length: frames per segment (``4n + 1``; upstream: 77).
            prev_segment_conditioning_frames: frames of the previous segment that condition the next (1 or 5).
            max_sequence_length: umT5 context length; default the transformer's ``text_len`` (512).
            cfg_batching: with guidance (``guidance_scale > 1``), run the conditional and the unconditional (blank
                face) pass as one transformer forward of batch ``2 x B`` (default: :attr:`cfg_batching`, ``True``);
                ``False``: stock's two forwards, bit for bit.
            sliding_window_size (`int`, *optional*), sliding_window_stride (`int`, *optional*):
                Not supported by this model (a ``ValueError`` gives the reason); long videos come from ``segment_frame_length``.
            Other arguments: as :meth:`diffusers.WanAnimatePipeline.__call__`.

        Videos may be video file paths, lists of PIL images, numpy arrays ``[F, H, W, 3]`` (uint8 or float in
        [0, 1]) or torch tensors ``[F, 3, H, W]`` in [-1, 1]; masks also ``[F, H, W]`` arrays.  The pose, face,
        background and mask videos must have the same number of frames.
        """
        self.check_sliding_window_options(sliding_window_size, sliding_window_stride)
        if inpaint_video is not None:
            if background_video is not None:
                raise ValueError("pass the background either as background_video or as inpaint_video, not both")
            background_video = inpaint_video
        image, pose, face, background, mask, mode = self._validate_and_load(
            image, pose_video, face_video, background_video, mask_video, mode, height, width, segment_frame_length,
            prev_segment_conditioning_frames,
        )
        max_sequence_length = self._check_text_len(max_sequence_length, prompt_embeds, negative_prompt_embeds)
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        self.check_inputs(
            prompt, negative_prompt, image, pose, face, background, mask, height, width, prompt_embeds,
            negative_prompt_embeds, image_embeds, callback_on_step_end_tensor_inputs, mode,
            prev_segment_conditioning_frames,
        )
        self._guidance_scale = guidance_scale
        self._attention_kwargs = attention_kwargs
        self._current_timestep = None
        self._interrupt = False
        device = self._execution_device
        if prompt is not None:
            batch_size = (1 if isinstance(prompt, str) else len(prompt)) * num_videos_per_prompt
        else:
            batch_size = prompt_embeds.shape[0] * num_videos_per_prompt

        transformer_dtype = self.transformer.dtype
        prompt_embeds, negative_prompt_embeds = self.encode_text(
            prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
            num_videos_per_prompt=num_videos_per_prompt, max_sequence_length=max_sequence_length,
            dtype=transformer_dtype, device=device,
        )

        image_pixels, image_embeds = self._reference_image_inputs(
            image, image_embeds, batch_size, height, width, device, transformer_dtype
        )
        num_target_frames, starts = plan_segments(len(pose), segment_frame_length, prev_segment_conditioning_frames)
        videos = self._driving_videos(pose, face, background, mask, num_target_frames, height, width, device)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        conditioning = dict(
            reference_image_latents=self.prepare_reference_image_latents(
                image_pixels, batch_size, generator=generator, device=device
            ),
            image_embeds=image_embeds,
            mode=mode,
            segment_frame_length=segment_frame_length,
            prev_segment_conditioning_frames=prev_segment_conditioning_frames,
            motion_encode_batch_size=motion_encode_batch_size,
        )
        denoise_kwargs = dict(
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            guidance_scale=guidance_scale,
            num_inference_steps=num_inference_steps,
            transformer_dtype=transformer_dtype,
            attention_kwargs=attention_kwargs,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            cfg_batching=cfg_batching,
        )
        denoise_kwargs["callback_on_step_end"] = self._embeddings_persist(callback_on_step_end, denoise_kwargs)

        out_frames, all_out_frames = None, []
        for start in starts:
            latents = self.prepare_latents(
                batch_size, self.vae.config.z_dim, height, width, segment_frame_length, torch.float32, device,
                generator, latents if start == 0 else None,  # the given latents: first segment only
            )
            inputs = self._segment_inputs(start, out_frames, videos, conditioning, generator)
            latents = self.denoise(latents, self.scheduler.timesteps, **inputs, **denoise_kwargs)
            latents, out_frames = self._decode_segment(latents)
            if start > 0:  # the first frames repeat the previous segment's last ones
                out_frames = out_frames[:, :, prev_segment_conditioning_frames:]
            all_out_frames.append(out_frames)
            self.scheduler.set_timesteps(num_inference_steps, device=device)  # fresh scheduler state per segment

        if output_type == "latent":
            video = latents  # as stock: the last segment's (un-normalized) latents
        else:
            video = torch.cat(all_out_frames, dim=2)[:, :, : len(pose)]
            video = self.video_processor.postprocess_video(video, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (video,)
        return WanPipelineOutput(frames=video)
