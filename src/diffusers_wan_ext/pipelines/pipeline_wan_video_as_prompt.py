"""``WanVideoAsPromptPipeline``: ByteDance Video-As-Prompt on Wan2.1-I2V-14B.

Image-to-video where a *reference video* (``vap_video``) and its caption (``vap_prompt``) say what should happen:
the generated video animates ``image`` with the semantics of the reference (its effect, motion, camera move).

What reaches :class:`~diffusers_wan_ext.WanVideoAsPromptTransformer3DModel`, as DiffSynth-Studio's
``WanVideoUnit_VAP`` and ByteDance's ``WanImageToVideoMOTPipeline`` build it:

* main stream: stock Wan2.1 I2V -- noisy latents + ``y`` (4 mask channels + VAE latents of ``[image, black...]``),
  CLIP features of ``image``, the umT5 context of ``prompt`` (``negative_prompt`` in the unconditional pass);
* reference stream: ``vap_hidden_states`` = normalized VAE latents of ``vap_video`` concatenated with the I2V ``y``
  of the reference's first frame (36 channels), CLIP features of that first frame, and the umT5 context of
  ``vap_prompt`` -- of ``negative_vap_prompt`` in the unconditional pass (default: ``negative_prompt``, as the
  references' examples pass);
* the reference video is resampled to ``num_frames`` frames spread evenly over it (``vap_frames_selection="evenly"``,
  the references' default; ``"first"`` takes the first ``num_frames``) and resized to ``width x height``.

Sampling is the shared Wan-Fun / I2V loop (:class:`~.pipeline_wan_fun_base.WanFunPipelineBase`): classifier-free
guidance, optional CFG batching, step callbacks, runtime options.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import numpy as np
import PIL.Image
import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import PipelineImageInput
from diffusers.pipelines.wan.pipeline_output import WanPipelineOutput

from ..utils.media import encode_video, load_image, load_video_frames
from .call_arguments import forwarded
from .fun_conditioning import i2v_condition
from .pipeline_wan_fun_base import WanFunCondition, WanFunPipelineBase

__all__ = ["WanVideoAsPromptPipeline", "select_reference_frames"]

FRAME_SELECTIONS = ("evenly", "first")


def select_reference_frames(video: Any, num_frames: int, selection: str = "evenly") -> Any:
    """``num_frames`` frames of a reference video (list of frames, ``[F, H, W, 3]`` array or ``[F, 3, H, W]`` tensor).

    ``"evenly"``: indices ``linspace(0, F - 1, num_frames)`` truncated to integers (ByteDance / DiffSynth examples);
    ``"first"``: the first ``num_frames`` frames.

    Example:
        >>> select_reference_frames(list(range(10)), 4)
        [0, 3, 6, 9]
    """
    if selection not in FRAME_SELECTIONS:
        raise ValueError(f"vap_frames_selection must be one of {FRAME_SELECTIONS}, got {selection!r}")
    n = len(video)
    if n == 0:
        raise ValueError("vap_video has no frames; pass the reference video as a list of PIL images, an array or a path")
    if selection == "first":
        if n < num_frames:
            raise ValueError(
                f"vap_video has {n} frames, fewer than num_frames={num_frames}: pass vap_frames_selection='evenly' "
                f"(frames are repeated) or num_frames <= {n}"
            )
        index = list(range(num_frames))
    else:
        index = torch.linspace(0, n - 1, num_frames).long().tolist()
    if isinstance(video, (np.ndarray, torch.Tensor)):
        return video[index]
    return [video[i] for i in index]


class WanVideoAsPromptPipeline(WanFunPipelineBase):
    r"""
    Video-As-Prompt: animate ``image`` with the semantics of a reference video (``vap_video`` + ``vap_prompt``).

    Components are those of :class:`diffusers.WanImageToVideoPipeline` with a
    :class:`~diffusers_wan_ext.WanVideoAsPromptTransformer3DModel` as ``transformer`` (convert the release with
    ``diffusers-wan convert Video-As-Prompt-Wan2.1-14B out`` or
    :func:`~diffusers_wan_ext.conversion.vap.convert_vap_release`).  See
    :class:`~diffusers_wan_ext.pipelines.pipeline_wan_fun_base.WanFunPipelineBase` for the arguments.

    Example:
        >>> import torch
        >>> import diffusers_wan_ext  # noqa: F401  (registers the classes with Diffusers)
        >>> from diffusers import DiffusionPipeline
        >>> from diffusers.utils import export_to_video, load_image, load_video
        >>> pipe = DiffusionPipeline.from_pretrained(  # doctest: +SKIP
        ...     "converted/Video-As-Prompt-Wan2.1-14B", dtype=torch.bfloat16
        ... )
        >>> pipe.enable_model_cpu_offload()  # doctest: +SKIP
        >>> video = pipe(  # doctest: +SKIP
        ...     image=load_image("woman.jpg"), prompt="A woman ... transforms into a Labubu toy ...",
        ...     vap_video=load_video("man_labubu.mp4"), vap_prompt="A man ... transforms into a Labubu toy ...",
        ...     negative_prompt="Bright tones, overexposed, ...", height=480, width=832, num_frames=49,
        ... ).frames[0]
        >>> export_to_video(video, "video_as_prompt.mp4", fps=16)  # doctest: +SKIP
    """

    _supported_y_channels = (20,)

    def check_transformer(self) -> None:
        super().check_transformer()
        if not getattr(self.transformer.config, "vap_layers", None):
            raise ValueError(
                f"{type(self).__name__} needs a Video-As-Prompt transformer (WanVideoAsPromptTransformer3DModel, "
                f"config vap_layers); got {type(self.transformer).__name__} -- for plain image-to-video use "
                "diffusers.WanImageToVideoPipeline"
            )
        if self.transformer_2 is not None and self.config.boundary_ratio is not None:
            raise ValueError("Video-As-Prompt has one transformer: set boundary_ratio=None / leave out transformer_2")

    def prepare_condition(
        self,
        height: int,
        width: int,
        num_frames: int,
        device: torch.device,
        image: torch.Tensor | None = None,
        vap_video: torch.Tensor | None = None,
        vap_prompt_embeds: torch.Tensor | None = None,
        negative_vap_prompt_embeds: torch.Tensor | None = None,
        vap_image_embeds: torch.Tensor | None = None,
    ) -> WanFunCondition:
        """Main ``y`` from ``image``; the reference stream's inputs from ``vap_video`` ``[1, 3, F, H, W]``."""
        y = i2v_condition(self.vae, image, num_frames)
        first = vap_video[:, :, 0]
        reference = torch.cat([encode_video(self.vae, vap_video), i2v_condition(self.vae, first, num_frames)], dim=1)
        if self.has_clip_branch and vap_image_embeds is None:
            vap_image_embeds = self.encode_clip_image(first, device)
        kwargs = {
            "vap_hidden_states": reference,
            "vap_encoder_hidden_states_image": vap_image_embeds,
            "vap_encoder_hidden_states": vap_prompt_embeds,
        }
        negative = {}
        if negative_vap_prompt_embeds is not None:
            negative["vap_encoder_hidden_states"] = negative_vap_prompt_embeds
        return WanFunCondition(y=y, clip_image=image, transformer_kwargs=kwargs, negative_transformer_kwargs=negative)

    def _load_reference_video(self, vap_video: Any, num_frames: int, height: int, width: int, selection: str
                              ) -> torch.Tensor:
        if vap_video is None:
            raise ValueError(
                "WanVideoAsPromptPipeline needs `vap_video`: the reference video whose semantics the result follows "
                "(a list of PIL images, an array [F, H, W, 3], a tensor or a video file path)"
            )
        if isinstance(vap_video, (str, os.PathLike)):
            path = os.fspath(vap_video)
            if not os.path.isfile(path):
                raise ValueError(f"vap_video: no video file at {path!r}")
            from diffusers.utils import load_video

            vap_video = load_video(path)
        if isinstance(vap_video, PIL.Image.Image):
            raise ValueError("vap_video is a single image; pass the reference video as a list of frames")
        if isinstance(vap_video, torch.Tensor) and vap_video.ndim == 5 and vap_video.shape[:2] == (1, 3):
            vap_video = vap_video[0].transpose(0, 1)  # [1, 3, F, H, W] -> [F, 3, H, W]
        frames = select_reference_frames(vap_video, num_frames, selection)
        if isinstance(frames, list) and frames and isinstance(frames[0], PIL.Image.Image):
            frames = [f.convert("RGB").resize((width, height)) for f in frames]
        return load_video_frames(frames, num_frames, height, width, name="vap_video")

    def _encode_reference_prompts(
        self, vap_prompt, negative_vap_prompt, vap_prompt_embeds, negative_vap_prompt_embeds, max_sequence_length,
        device,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if vap_prompt is not None and vap_prompt_embeds is not None:
            raise ValueError("pass either `vap_prompt` or `vap_prompt_embeds`, not both")
        if negative_vap_prompt is not None and negative_vap_prompt_embeds is not None:
            raise ValueError("pass either `negative_vap_prompt` or `negative_vap_prompt_embeds`, not both")
        for name, value in (("vap_prompt", vap_prompt), ("negative_vap_prompt", negative_vap_prompt)):
            if value is not None and not isinstance(value, str):
                raise ValueError(f"`{name}` must be a string (the caption of the one reference video), got "
                                 f"{type(value).__name__}")
        cfg = self.do_classifier_free_guidance
        if vap_prompt_embeds is None or (cfg and negative_vap_prompt_embeds is None):
            pos, neg = self.encode_prompt(
                prompt=vap_prompt if vap_prompt_embeds is None and vap_prompt is not None else "",
                negative_prompt=negative_vap_prompt or "",
                do_classifier_free_guidance=cfg and negative_vap_prompt_embeds is None,
                max_sequence_length=max_sequence_length,
                device=device,
            )
            vap_prompt_embeds = pos if vap_prompt_embeds is None else vap_prompt_embeds
            negative_vap_prompt_embeds = neg if negative_vap_prompt_embeds is None else negative_vap_prompt_embeds
        pad = lambda e: None if e is None else self._pad_text_context(e.to(device))  # noqa: E731
        return pad(vap_prompt_embeds), pad(negative_vap_prompt_embeds) if cfg else None

    @torch.no_grad()
    def __call__(
        self,
        image: PipelineImageInput | None = None,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        vap_video: Sequence[PIL.Image.Image] | np.ndarray | torch.Tensor | str | None = None,
        vap_prompt: str | None = None,
        negative_vap_prompt: str | None = None,
        vap_frames_selection: str = "evenly",
        height: int = 480,
        width: int = 832,
        num_frames: int = 49,
        num_inference_steps: int = 50,
        guidance_scale: float = 5.0,
        num_videos_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        vap_prompt_embeds: torch.Tensor | None = None,
        negative_vap_prompt_embeds: torch.Tensor | None = None,
        vap_image_embeds: torch.Tensor | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[[int, int], None] | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        max_sequence_length: int = 512,
        cfg_batching: bool | None = None,
        sliding_window_size: int | None = None,
        sliding_window_stride: int | None = None,
    ) -> WanPipelineOutput | tuple:
        r"""
        Generate a video that starts at ``image`` and follows the semantics of ``vap_video``.

        Args:
            image (`PIL.Image.Image`, `np.ndarray` or `torch.Tensor`):
                The first frame (required); PIL images are resized to ``width x height``.
            prompt (`str` or `list[str]`, *optional*): caption of the video to generate; or pass ``prompt_embeds``.
            negative_prompt (`str` or `list[str]`, *optional*): negative prompt (default ``""``).
            vap_video (list of `PIL.Image.Image`, `np.ndarray` `[F, H, W, 3]`, `torch.Tensor` `[F, 3, H, W]` in
                [-1, 1], or a video file path):
                The reference video (required).  ``num_frames`` frames are taken from it (``vap_frames_selection``);
                PIL frames are resized to ``width x height``, arrays and tensors must have that size.
            vap_prompt (`str`, *optional*): caption of the reference video (default ``""``); or ``vap_prompt_embeds``.
            negative_vap_prompt (`str`, *optional*):
                The reference stream's prompt in the unconditional pass; default: ``negative_prompt``.
            vap_frames_selection (`str`, defaults to ``"evenly"``): ``"evenly"`` or ``"first"``.
            height (`int`, defaults to 480), width (`int`, defaults to 832): video size, multiples of 16.
            num_frames (`int`, defaults to 49): frames, ``4n + 1`` (the release examples use 49).
            num_inference_steps (`int`, defaults to 50): denoising steps.
            guidance_scale (`float`, defaults to 5.0): classifier-free guidance scale; ``<= 1`` disables CFG.
            num_videos_per_prompt (`int`, defaults to 1): videos per prompt.
            generator, latents: the initial noise (``latents``: ``[B, 16, T_lat, H/8, W/8]``).
            prompt_embeds, negative_prompt_embeds, vap_prompt_embeds, negative_vap_prompt_embeds (*optional*):
                precomputed umT5 contexts.
            image_embeds, vap_image_embeds (*optional*): precomputed CLIP features of ``image`` / the reference's
                first frame.
            output_type (`str`, defaults to `"np"`): ``"np"``, ``"pil"``, ``"pt"`` or ``"latent"``.
            return_dict, attention_kwargs, callback_on_step_end, callback_on_step_end_tensor_inputs,
            max_sequence_length: as in stock Diffusers pipelines.
            cfg_batching (`bool`, *optional*):
                Run the conditional and the unconditional pass as one transformer forward of batch ``2 x B``
                (``False``: two forwards per step, as stock); ``None``: the pipeline's :attr:`cfg_batching`
                (``True`` unless set).
            sliding_window_size (`int`, *optional*), sliding_window_stride (`int`, *optional*):
                Temporal sliding windows in latent frames (DiffSynth-Studio's option): each transformer forward runs per
                window of ``sliding_window_size`` latent frames, ``sliding_window_stride`` apart, and the windows are
                blended (:mod:`diffusers_wan_ext.hooks.sliding_window`, ``docs/long_video.md``).  ``None``: off.

        Examples:
            >>> video = pipe(image=img, prompt="...", vap_video=ref_frames, vap_prompt="...").frames[0]  # doctest: +SKIP

        Returns:
            [`WanPipelineOutput`] with ``frames``, or a tuple ``(frames,)`` when ``return_dict=False``.
        """
        self.check_sliding_window_options(sliding_window_size, sliding_window_stride)
        if image is None:
            raise ValueError("WanVideoAsPromptPipeline needs `image`: the first frame of the video to generate")
        self.check_fun_inputs(
            prompt, negative_prompt, height, width, num_frames, prompt_embeds, negative_prompt_embeds, image_embeds,
            callback_on_step_end_tensor_inputs,
        )
        if vap_image_embeds is not None and not self.has_clip_branch:
            raise ValueError("`vap_image_embeds` given, but this transformer has no CLIP image branch: leave it out")
        first = load_image(image, height, width, name="image")
        reference = self._load_reference_video(vap_video, num_frames, height, width, vap_frames_selection)
        if negative_vap_prompt is None and negative_vap_prompt_embeds is None and isinstance(negative_prompt, str):
            negative_vap_prompt = negative_prompt
        self._guidance_scale = guidance_scale  # encode_prompt below reads do_classifier_free_guidance
        vap_embeds, negative_vap_embeds = self._encode_reference_prompts(
            vap_prompt, negative_vap_prompt, vap_prompt_embeds, negative_vap_prompt_embeds, max_sequence_length,
            self._execution_device,
        )
        condition_inputs = {
            "image": first, "vap_video": reference, "vap_prompt_embeds": vap_embeds,
            "negative_vap_prompt_embeds": negative_vap_embeds, "vap_image_embeds": vap_image_embeds,
        }
        return self.generate(**forwarded(locals(), self.generate))
