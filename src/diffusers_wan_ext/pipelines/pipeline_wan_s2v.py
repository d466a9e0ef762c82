"""``WanSpeechToVideoPipeline``: Wan2.2-S2V-14B speech-to-video, clip after clip for as long as the audio lasts.

One call generates a whole talking / singing video from a reference ``image``, an ``audio`` track (a file or an array
with ``audio_sample_rate``) and a prompt, optionally driven by a ``pose_video`` and continuing a ``motion_video``.
The procedure is the original ``WanS2V.generate`` (``wan/speech2video.py``), which DiffSynth-Studio's multi-clip
example reproduces:

1. audio -> Wav2Vec2 hidden states of all layers -> per video frame at ``fps`` -> clips of ``num_frames_per_clip``
   frames (:mod:`~diffusers_wan_ext.pipelines.s2v_conditioning`); the clip count follows the audio (``num_clips``
   caps it);
2. the reference image's VAE latent (the transformer's reference tokens), the pose latents of each clip (none: zero
   pose), and the motion history: the last 73 frames, initially empty (zeros) or the end of ``motion_video``;
3. per clip: fresh noise and schedule, the denoising loop with classifier-free guidance -- the unconditional pass
   has the negative prompt *and zero audio* -- and the motion tokens of the history, except in the first clip of a
   video without ``motion_video`` (no history yet: ``drop_motion_frames``);
4. decode: with history, the clip's latents after the history's 19 latent frames, keeping the clip's last
   ``num_frames_per_clip`` frames; without, after the reference latent, dropping its first 3 frames (the original
   does both); the clip's frames then become the end of the history for the next clip.

The video is the concatenation of the clips: ``num_frames_per_clip * num_clips`` frames, 3 fewer when the first
clip has no history.  Pair it with the audio at ``fps`` (upstream merges the audio from its start).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import PipelineImageInput
from diffusers.models import AutoencoderKLWan
from diffusers.pipelines.wan.pipeline_output import WanPipelineOutput
from diffusers.pipelines.wan.pipeline_wan import WanPipeline
from diffusers.schedulers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler
from diffusers.utils.torch_utils import get_module_execution_device, randn_tensor
from diffusers.video_processor import VideoProcessor
from transformers import (
    AutoTokenizer,
    UMT5EncoderModel,
    Wav2Vec2FeatureExtractor,
    Wav2Vec2ForCTC,
    Wav2Vec2Model,
    Wav2Vec2Processor,
)

from ..lora.loader import WanLoraInteropMixin
from ..utils.shims import ShimPipelineMixin
from ..models.transformer_wan_s2v import WanS2VTransformer3DModel
from ..schedulers import WanFlowMatchScheduler
from ..utils.media import encode_video, load_image
from .call_arguments import forwarded
from .denoising import WanDenoisingMixin
from .runtime_options import WanRuntimeOptionsMixin
from .s2v_conditioning import (
    audio_embeds_per_clip,
    load_audio,
    load_pose_video,
    motion_history,
    pose_latents_per_clip,
)

__all__ = ["WanSpeechToVideoPipeline"]

#: Frames the original drops from the start of a video generated without motion history (``image[:, :, 3:]``).
FIRST_CLIP_TRIM = 3


class WanSpeechToVideoPipeline(
    ShimPipelineMixin, WanLoraInteropMixin, WanRuntimeOptionsMixin, WanDenoisingMixin, DiffusionPipeline
):
    r"""
    Speech-to-video with Wan2.2-S2V-14B: a reference image speaks / sings an audio track, clip after clip.

    Args:
        tokenizer ([`AutoTokenizer`]): umT5 tokenizer (may be ``None`` when only ``prompt_embeds`` are passed).
        text_encoder ([`UMT5EncoderModel`]): umT5 encoder (may be ``None`` when only ``prompt_embeds`` are passed).
        vae ([`AutoencoderKLWan`]): the Wan2.1 VAE.
        scheduler ([`UniPCMultistepScheduler`], [`FlowMatchEulerDiscreteScheduler`] or another flow scheduler):
            the release samples with UniPC at shift 3 (``flow_shift``), 40 steps, guidance 4.5.
        transformer ([`~diffusers_wan_ext.WanS2VTransformer3DModel`]): the S2V DiT.
        audio_encoder ([`~transformers.Wav2Vec2Model`] or [`~transformers.Wav2Vec2ForCTC`], *optional*):
            wav2vec2-large-xlsr-53-english (all 25 hidden states are used); may be ``None`` with ``audio_embeds``.
        audio_processor ([`~transformers.Wav2Vec2Processor`] or [`~transformers.Wav2Vec2FeatureExtractor`],
            *optional*): its feature extractor (16 kHz, normalised input).

    Example:
        >>> import torch
        >>> import diffusers_wan_ext  # noqa: F401  (registers the classes with Diffusers)
        >>> from diffusers import DiffusionPipeline
        >>> from diffusers.utils import export_to_video, load_image
        >>> pipe = DiffusionPipeline.from_pretrained("converted/Wan2.2-S2V-14B", dtype=torch.bfloat16)  # doctest: +SKIP
        >>> pipe.enable_model_cpu_offload()  # doctest: +SKIP
        >>> video = pipe(  # doctest: +SKIP
        ...     image=load_image("singer.png"), audio="song.wav", prompt="a person is singing",
        ...     height=448, width=832,
        ... ).frames[0]
        >>> export_to_video(video, "s2v.mp4", fps=16)  # doctest: +SKIP
    """

    model_cpu_offload_seq = "text_encoder->audio_encoder->transformer->vae"
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]
    _optional_components = ["tokenizer", "text_encoder", "audio_encoder", "audio_processor"]

    # text encoding and the loop's state: stock WanPipeline's
    encode_prompt = WanPipeline.encode_prompt
    _get_t5_prompt_embeds = WanPipeline._get_t5_prompt_embeds
    guidance_scale = WanPipeline.guidance_scale
    do_classifier_free_guidance = WanPipeline.do_classifier_free_guidance
    num_timesteps = WanPipeline.num_timesteps
    current_timestep = WanPipeline.current_timestep
    interrupt = WanPipeline.interrupt
    attention_kwargs = WanPipeline.attention_kwargs

    def __init__(
        self,
        tokenizer: AutoTokenizer,
        text_encoder: UMT5EncoderModel,
        vae: AutoencoderKLWan,
        scheduler: UniPCMultistepScheduler | FlowMatchEulerDiscreteScheduler | WanFlowMatchScheduler,
        transformer: WanS2VTransformer3DModel,
        audio_encoder: Wav2Vec2Model | Wav2Vec2ForCTC | None = None,
        audio_processor: Wav2Vec2Processor | Wav2Vec2FeatureExtractor | None = None,
    ) -> None:
        super().__init__()
        self.register_modules(
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            vae=vae,
            scheduler=scheduler,
            transformer=transformer,
            audio_encoder=audio_encoder,
            audio_processor=audio_processor,
        )
        self.vae_scale_factor_temporal = self.vae.config.scale_factor_temporal if getattr(self, "vae", None) else 4
        self.vae_scale_factor_spatial = self.vae.config.scale_factor_spatial if getattr(self, "vae", None) else 8
        self.video_processor = VideoProcessor(vae_scale_factor=self.vae_scale_factor_spatial)

    # ------------------------------------------------------------------------------------------------ parts
    @property
    def audio_sample_rate(self) -> int:
        """The rate the audio encoder expects (the feature extractor's ``sampling_rate``; 16000)."""
        proc = getattr(self.audio_processor, "feature_extractor", self.audio_processor)
        return int(getattr(proc, "sampling_rate", 16000))

    def encode_audio(
        self,
        audio: Any,
        audio_sample_rate: int = 16000,
        num_frames_per_clip: int = 80,
        fps: int = 16,
    ) -> list[torch.Tensor]:
        """The transformer's ``audio_embeds`` of every clip the audio spans, ``[1, 25, 1024, num_frames_per_clip]``
        each (see :mod:`~diffusers_wan_ext.pipelines.s2v_conditioning`)."""
        if self.audio_encoder is None or self.audio_processor is None:
            raise ValueError(
                "`audio` needs the pipeline's `audio_encoder` (Wav2Vec2Model) and `audio_processor` "
                "(Wav2Vec2Processor): load a converted Wan2.2-S2V folder, pass them, or pass precomputed `audio_embeds`"
            )
        rate = self.audio_sample_rate
        samples = load_audio(audio, audio_sample_rate, target_rate=rate)
        seconds, clip_seconds = len(samples) / rate, num_frames_per_clip / fps
        if seconds < clip_seconds:
            raise ValueError(
                f"the audio lasts {seconds:.2f} s, shorter than one clip ({num_frames_per_clip} frames at {fps} fps = "
                f"{clip_seconds:.2f} s): pass longer audio or a smaller num_frames_per_clip (a multiple of 4)"
            )
        device = get_module_execution_device(self.audio_encoder)
        return audio_embeds_per_clip(
            self.audio_encoder, self.audio_processor, samples, rate, fps=fps, frames_per_clip=num_frames_per_clip,
            device=device,
        )

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> pixels ``[B, 3, T, H, W]`` in [-1, 1] (float32, on the latents' device)."""
        device = latents.device
        z = self.vae.config.z_dim
        latents = latents.to(device=get_module_execution_device(self.vae), dtype=self.vae.dtype)
        mean = torch.tensor(self.vae.config.latents_mean).view(1, z, 1, 1, 1).to(latents)
        std = torch.tensor(self.vae.config.latents_std).view(1, z, 1, 1, 1).to(latents)
        return self.vae.decode(latents * std + mean, return_dict=False)[0].float().to(device)

    # ---------------------------------------------------------------------------------------------- checks
    def check_s2v_inputs(
        self,
        image,
        audio,
        audio_embeds,
        prompt,
        negative_prompt,
        prompt_embeds,
        negative_prompt_embeds,
        height: int,
        width: int,
        num_frames_per_clip: int,
        num_clips: int | None,
        fps: int,
        callback_on_step_end_tensor_inputs: list[str] | None,
    ) -> None:
        if not isinstance(self.transformer, WanS2VTransformer3DModel):
            raise ValueError(
                f"{type(self).__name__} needs a WanS2VTransformer3DModel `transformer` (the Wan2.2-S2V DiT), got "
                f"{type(self.transformer).__name__}"
            )
        if image is None:
            raise ValueError("pass `image`: the reference image of the person (a PIL image, path or array)")
        if (audio is None) == (audio_embeds is None):
            raise ValueError(
                "pass exactly one of `audio` (a path to an audio file, or a 1-D array with `audio_sample_rate`) and "
                "`audio_embeds` (precomputed per-clip audio features)"
            )
        multiple = self.vae_scale_factor_spatial * self.transformer.config.patch_size[1]
        if height <= 0 or width <= 0 or height % multiple or width % multiple:
            raise ValueError(
                f"height and width must be positive multiples of {multiple} (VAE factor x patch size), got "
                f"{height}x{width}; e.g. pass height={max(multiple, height // multiple * multiple)}, "
                f"width={max(multiple, width // multiple * multiple)}"
            )
        t = self.vae_scale_factor_temporal
        if isinstance(num_frames_per_clip, bool) or not isinstance(num_frames_per_clip, int) or (
            num_frames_per_clip < t or num_frames_per_clip % t
        ):
            raise ValueError(
                f"num_frames_per_clip must be a positive multiple of {t} (the release uses 80), got "
                f"{num_frames_per_clip!r}"
            )
        if num_clips is not None and (isinstance(num_clips, bool) or not isinstance(num_clips, int) or num_clips < 1):
            raise ValueError(f"num_clips must be a positive integer or None (as many as the audio spans), got {num_clips!r}")
        if isinstance(fps, bool) or not isinstance(fps, int) or fps <= 0:
            raise ValueError(f"fps must be a positive integer (the release uses 16), got {fps!r}")
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("pass either `prompt` or `prompt_embeds`, not both")
        if prompt is None and prompt_embeds is None:
            raise ValueError("pass `prompt` (a string) or `prompt_embeds`")
        if isinstance(prompt, list) and len(prompt) != 1 or prompt is not None and not isinstance(prompt, (str, list)):
            raise ValueError(f"`prompt` must be one string (one video per call), got {prompt!r}")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("pass either `negative_prompt` or `negative_prompt_embeds`, not both")
        for name, emb in (("prompt_embeds", prompt_embeds), ("negative_prompt_embeds", negative_prompt_embeds)):
            if emb is not None and (emb.ndim != 3 or emb.shape[0] != 1):
                raise ValueError(f"`{name}` must be [1, L, text_dim] (one video per call), got {tuple(emb.shape)}")
        bad = [k for k in (callback_on_step_end_tensor_inputs or []) if k not in self._callback_tensor_inputs]
        if bad:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs must be among {self._callback_tensor_inputs}, got {bad}"
            )

    def _clip_audio(self, audio_embeds, num_frames_per_clip: int) -> list[torch.Tensor]:
        cfg = self.transformer.config
        clips = list(audio_embeds) if isinstance(audio_embeds, (list, tuple)) else None
        if clips is None:
            if not torch.is_tensor(audio_embeds) or audio_embeds.ndim != 4 or audio_embeds.shape[-1] % num_frames_per_clip:
                shape = tuple(audio_embeds.shape) if torch.is_tensor(audio_embeds) else type(audio_embeds).__name__
                raise ValueError(
                    f"audio_embeds must be a list of per-clip tensors [1, {cfg.audio_num_layers}, {cfg.audio_dim}, "
                    f"{num_frames_per_clip}] or one tensor whose last axis is a multiple of num_frames_per_clip="
                    f"{num_frames_per_clip}, got {shape}"
                )
            clips = list(audio_embeds.split(num_frames_per_clip, dim=-1))
        want = (1, cfg.audio_num_layers, cfg.audio_dim, num_frames_per_clip)
        for i, clip in enumerate(clips):
            if not torch.is_tensor(clip) or tuple(clip.shape) != want:
                shape = tuple(clip.shape) if torch.is_tensor(clip) else type(clip).__name__
                raise ValueError(f"audio_embeds[{i}] must be {list(want)}, got {shape}")
        if not clips:
            raise ValueError("audio_embeds is empty")
        return clips

    # ------------------------------------------------------------------------------------------ generation
    @torch.no_grad()
    def __call__(
        self,
        image: PipelineImageInput,
        audio: str | np.ndarray | torch.Tensor | None = None,
        prompt: str | None = None,
        negative_prompt: str | None = None,
        audio_sample_rate: int = 16000,
        pose_video: Any | None = None,
        motion_video: Any | None = None,
        height: int = 480,
        width: int = 832,
        num_frames_per_clip: int = 80,
        num_clips: int | None = None,
        fps: int = 16,
        num_inference_steps: int = 40,
        guidance_scale: float = 4.5,
        generator: torch.Generator | list[torch.Generator] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        audio_embeds: torch.Tensor | list[torch.Tensor] | None = None,
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
        Generate a video of ``image`` driven by ``audio``, as long as the audio (whole clips).

        Args:
            image (`PIL.Image.Image`, path, `np.ndarray` or `torch.Tensor`):
                The reference image (required); PIL images are resized to ``width x height``.
            audio (`str` or 1-D array, *optional*):
                A path to an audio file (``.wav`` read directly; other formats and rates via ffmpeg, resampled to
                the audio encoder's 16 kHz) or mono samples at ``audio_sample_rate``.  Must last at least one clip
                (``num_frames_per_clip / fps`` seconds).  Or pass ``audio_embeds``.
            prompt (`str`): the prompt (or ``prompt_embeds``).
            negative_prompt (`str`, *optional*): the negative prompt (default ``""``; the release suggests a
                Chinese negative prompt, see ``examples/speech_to_video.py``).
            audio_sample_rate (`int`, defaults to 16000): rate of an ``audio`` array; it must be the encoder's rate
                (arrays are not resampled).  Files carry their own rate.
            pose_video (*optional*): a pose video (path, list of PIL images, numpy ``[N, H, W, 3]``, torch
                ``[N, 3, H, W]``) at ``fps``; frames past its end are black.  Without it the pose input is zero.
            motion_video (*optional*): frames that precede the video (same formats; its last 73 frames are the
                first clip's motion history).  Without it the first clip starts from the image alone.
            height (`int`, defaults to 480), width (`int`, defaults to 832): video size, multiples of 16.
            num_frames_per_clip (`int`, defaults to 80): frames per clip, a multiple of 4 (release: 80).
            num_clips (`int`, *optional*): at most this many clips (default: every clip the audio spans).
            fps (`int`, defaults to 16): video frame rate the audio is matched to (release: 16).
            num_inference_steps (`int`, defaults to 40): denoising steps per clip.
            guidance_scale (`float`, defaults to 4.5): classifier-free guidance; the unconditional pass has the
                negative prompt and zero audio.  ``<= 1`` disables it.
            generator (`torch.Generator`, *optional*): draws every clip's noise in turn.
            prompt_embeds, negative_prompt_embeds (`torch.Tensor`, *optional*): precomputed umT5 embeddings.
            audio_embeds (*optional*): precomputed audio features instead of ``audio``: a list of per-clip tensors
                ``[1, 25, 1024, num_frames_per_clip]`` or one tensor of whole clips (``encode_audio`` makes them).
            output_type (`str`, defaults to `"np"`): ``"np"``, ``"pil"``, ``"pt"`` or ``"latent"`` (the clips'
                latents concatenated in time).
            return_dict (`bool`, defaults to `True`): return a [`WanPipelineOutput`] rather than a tuple.
            attention_kwargs (`dict`, *optional*): passed to the attention processors (e.g. LoRA ``scale``).
            callback_on_step_end, callback_on_step_end_tensor_inputs: as in stock Diffusers pipelines (called at
                every step of every clip; the step index restarts with each clip).
            max_sequence_length (`int`, defaults to 512): umT5 context length.
            cfg_batching (`bool`, *optional*): cond + uncond in one forward (default: :attr:`cfg_batching`).
            sliding_window_size (`int`, *optional*), sliding_window_stride (`int`, *optional*):
                Not supported by this model (a ``ValueError`` gives the reason); long videos come from the clips.

        Returns:
            [`WanPipelineOutput`] with ``frames`` (one video), or ``(frames,)`` when ``return_dict=False``.
        """
        self.check_sliding_window_options(sliding_window_size, sliding_window_stride)
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        self.check_s2v_inputs(
            image, audio, audio_embeds, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, height, width,
            num_frames_per_clip, num_clips, fps, callback_on_step_end_tensor_inputs,
        )
        if isinstance(prompt, list):
            prompt = prompt[0]
        self._guidance_scale = guidance_scale
        self._attention_kwargs = attention_kwargs
        self._current_timestep = None
        self._interrupt = False
        device = self._execution_device
        transformer_dtype = self.transformer.dtype
        cfg = self.transformer.config

        # 1. audio per clip (checked first: the cheapest input to get wrong)
        if audio is not None:
            clips_audio = self.encode_audio(audio, audio_sample_rate, num_frames_per_clip, fps)
        else:
            clips_audio = self._clip_audio(audio_embeds, num_frames_per_clip)
        if num_clips is not None:
            clips_audio = clips_audio[:num_clips]
        n_clips = len(clips_audio)

        # 2. text
        prompt_embeds, negative_prompt_embeds = self.encode_text(
            prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, num_videos_per_prompt=1,
            max_sequence_length=max_sequence_length, dtype=transformer_dtype, device=device,
        )

        # 3. reference image, pose, motion history
        ref_pixels = load_image(image, height, width, name="image")
        ref_latents = encode_video(self.vae, ref_pixels.unsqueeze(2)).to(device=device, dtype=torch.float32)
        pose_latents: list[torch.Tensor | None] = [None] * n_clips
        if pose_video is not None:
            pose = load_pose_video(pose_video, height, width, fps=fps, max_frames=n_clips * num_frames_per_clip)
            pose_latents = pose_latents_per_clip(self.vae, pose, n_clips, num_frames_per_clip)
        history = None
        if motion_video is not None:
            history = load_pose_video(motion_video, height, width, fps=fps, name="motion_video")
        history = motion_history(history, cfg.motion_frames, height, width)
        motion_latents = encode_video(self.vae, history).to(device=device, dtype=torch.float32)
        drop_first = motion_video is None

        # 4. clip after clip
        shape = (
            1,
            self.vae.config.z_dim,
            num_frames_per_clip // self.vae_scale_factor_temporal,
            height // self.vae_scale_factor_spatial,
            width // self.vae_scale_factor_spatial,
        )
        frames, latents_out = [], []
        for r, clip_audio in enumerate(clips_audio):
            if self.interrupt:
                break
            drop = drop_first and r == 0
            self.scheduler.set_timesteps(num_inference_steps, device=device)
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
            clip_audio = clip_audio.to(device=device, dtype=transformer_dtype)
            pose = pose_latents[r]
            kwargs = dict(
                audio_embeds=clip_audio,
                image_latents=ref_latents.to(transformer_dtype),
                pose_latents=None if pose is None else pose.to(device=device, dtype=transformer_dtype),
                motion_latents=motion_latents.to(transformer_dtype),
                drop_motion_frames=drop,
            )
            latents = self.denoise(**forwarded(
                locals(),
                self.denoise,
                timesteps=self.scheduler.timesteps,
                transformer_kwargs=kwargs,
                uncond_transformer_kwargs={"audio_embeds": torch.zeros_like(clip_audio)},
                broadcast_kwargs=("image_latents", "pose_latents", "motion_latents"),
            ))
            latents_out.append(latents)
            if output_type == "latent":
                continue
            # decode after the history (or the reference frame), keep the clip's frames
            context = ref_latents if drop else motion_latents
            clip = self._decode(torch.cat([context, latents], dim=2))[:, :, -num_frames_per_clip:]
            if drop:
                clip = clip[:, :, FIRST_CLIP_TRIM:]
            frames.append(clip)
            if r + 1 < n_clips:  # the clip's frames end the history of the next clip
                keep = min(cfg.motion_frames, clip.shape[2])
                history = torch.cat([history[:, :, keep:], clip[:, :, -keep:].to(history)], dim=2)
                motion_latents = encode_video(self.vae, history).to(device=device, dtype=torch.float32)

        self._current_timestep = None
        if output_type == "latent":
            video = torch.cat(latents_out, dim=2)
        else:
            video = self.video_processor.postprocess_video(torch.cat(frames, dim=2), output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (video,)
        return WanPipelineOutput(frames=video)
