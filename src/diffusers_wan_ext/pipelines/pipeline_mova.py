"""``MovaPipeline``: MOVA (openmoss/MOVA-360p / MOVA-720p) image -> video with its sound track.

One call turns an image and a prompt into video frames and a 48 kHz mono waveform, as DiffSynth-Studio's
``MovaAudioVideoPipeline`` does:

1. the umT5 context of the prompt (and of the negative prompt for classifier-free guidance), shared by both towers;
2. the I2V condition ``y``: the first-frame mask and the video VAE latents of ``[image, 0, ..., 0]`` (Wan I2V);
3. noise for the video latents ``[1, 16, (num_frames - 1) / 4 + 1, H / 8, W / 8]`` and the audio latents
   ``[1, 128, L]``, ``L = (int(sample_rate * num_frames / frame_rate) - 1) // hop + 1``, as DiffSynth-Studio's
   ``MovaAudioVideoUnit_NoiseInitializer`` draws them: float32, video first, then audio, **each from the generator's
   state at the start of the call** (DiffSynth re-seeds ``torch.Generator(rand_device).manual_seed(seed)`` for each);
   with a CPU ``generator=torch.Generator().manual_seed(seed)`` both equal DiffSynth's for ``seed``
   (:mod:`~diffusers_wan_ext.pipelines.seeded_noise`);
4. the flow-matching loop: each step is one joint forward per guidance branch
   (:func:`~diffusers_wan_ext.models.mova_joint_forward.mova_joint_forward`) with the high-noise video expert
   (``transformer``) while ``t >= boundary_ratio * 1000``, then the low-noise one (``transformer_2``); the timestep
   reaches both towers in the video expert's dtype (in bf16 it is rounded, as DiffSynth's ``timestep.to(torch_dtype)``
   does; the expert switch and the scheduler use the float32 value); one guidance scale for video and audio;
   **the latents stay in the video expert's dtype between steps**, as DiffSynth keeps them in its pipeline dtype
   (:attr:`MovaPipeline.latents_dtype`): the noise is cast to it, the guidance runs in it and the Euler step is
   DiffSynth's ``sample + model_output * (sigma_next - sigma)`` in that dtype;
5. decode: the video VAE -> frames, the DAC audio VAE -> waveform (from the latents in that dtype).

The release's ``model_index.json`` fields (OpenMOSS ``MOVA.__init__``) are the pipeline's config: ``boundary_ratio``
(the expert switch) and ``audio_vae_type`` (only ``"dac"``: :func:`check_mova_pipeline_fields`).

LoRAs load with ``load_lora_weights`` (every Wan format for the video experts, Diffusers keys for the audio tower
and the bridge).  TeaCache, sliding windows and sequence parallelism are refused (see
:attr:`MovaPipeline.unsupported`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.image_processor import PipelineImageInput
from diffusers.models import AutoencoderKLWan, WanTransformer3DModel
from diffusers.pipelines.wan.pipeline_wan import WanPipeline
from diffusers.schedulers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import get_module_execution_device
from diffusers.video_processor import VideoProcessor
from transformers import AutoTokenizer, UMT5EncoderModel

from ..lora.loader import WanLoraInteropMixin
from ..models.autoencoder_dac import AutoencoderDac
from ..models.mova_bridge import MovaDualTowerBridge
from ..models.mova_joint_forward import mova_joint_forward
from ..models.transformer_mova_audio import MovaAudioTransformer1DModel
from ..schedulers import WanFlowMatchScheduler
from ..utils.media import check_frame_count, check_positive_ints, load_image
from ..utils.shims import ShimPipelineMixin
from .fun_conditioning import i2v_condition
from .runtime_options import WanRuntimeOptionsMixin
from .seeded_noise import copy_generator, seeded_noise

__all__ = ["MOVA_AUDIO_VAE_TYPES", "MovaPipeline", "MovaPipelineOutput", "check_mova_pipeline_fields",
           "mova_audio_length"]

#: ``audio_vae_type`` values this pipeline takes: the DAC autoencoder (:class:`AutoencoderDac`).  The original
#: ``MOVA`` pipeline also names ``"oobleck"`` (``Literal["oobleck", "dac"]``), which no class here implements.
MOVA_AUDIO_VAE_TYPES = ("dac",)


def check_mova_pipeline_fields(boundary_ratio: Any, audio_vae_type: Any, source: str = "MovaPipeline") -> None:
    """One-line ``ValueError`` (starting with ``source``: the file or class they come from) for a ``boundary_ratio``
    or ``audio_vae_type`` the pipeline cannot honour.

    Example:
        >>> check_mova_pipeline_fields(0.9, "dac")
        >>> check_mova_pipeline_fields(0.9, "oobleck", "MOVA-360p/model_index.json")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: MOVA-360p/model_index.json: audio_vae_type 'oobleck' is not supported: ...
    """
    if isinstance(boundary_ratio, bool) or not isinstance(boundary_ratio, (int, float)) \
            or not 0.0 <= boundary_ratio <= 1.0:
        raise ValueError(f"{source}: boundary_ratio must be a number in [0, 1] (video_dit, the high-noise expert, "
                         f"runs while t >= boundary_ratio * 1000, then video_dit_2); got {boundary_ratio!r}")
    if audio_vae_type not in MOVA_AUDIO_VAE_TYPES:
        known = ("an Oobleck audio VAE, which the original MOVA code names but this package does not implement"
                 if audio_vae_type == "oobleck" else "unknown")
        raise ValueError(f"{source}: audio_vae_type {audio_vae_type!r} is not supported: {known}; MOVA's audio VAE "
                         f"is 'dac' (AutoencoderDac)")


def mova_audio_length(num_frames: int, frame_rate: float, sample_rate: int, hop_length: int) -> int:
    """Audio latents of a clip of ``num_frames`` at ``frame_rate``: ``(int(sr * n / fps) - 1) // hop + 1``.

    Example:
        >>> mova_audio_length(9, 24.0, 48000, 960)
        19
    """
    return (int(sample_rate * num_frames / frame_rate) - 1) // hop_length + 1


@dataclass
class MovaPipelineOutput(BaseOutput):
    """Output of :class:`MovaPipeline`.

    Args:
        frames: the video (``output_type`` "np": ``[B, F, H, W, 3]`` in ``[0, 1]``; "pt": ``[B, F, 3, H, W]``;
            "pil": lists of images; "latent": the latents).
        audio: the waveform ``[B, samples]`` float32 in ``[-1, 1]`` (numpy for "np" / "pil", torch for "pt"; the
            audio latents for "latent").
        audio_sample_rate: samples per second of ``audio``.
    """

    frames: Any = None
    audio: Any = None
    audio_sample_rate: int = 48000


class MovaPipeline(ShimPipelineMixin, WanLoraInteropMixin, WanRuntimeOptionsMixin, DiffusionPipeline):
    r"""
    MOVA image-to-video-with-audio: a Wan2.2-I2V video tower (two experts) and a 1-D audio tower denoised together
    through the dual-tower bridge.

    Args:
        tokenizer ([`AutoTokenizer`]): umT5 tokenizer (may be ``None`` with ``prompt_embeds``).
        text_encoder ([`UMT5EncoderModel`]): umT5 encoder (may be ``None`` with ``prompt_embeds``).
        vae ([`AutoencoderKLWan`]): the Wan2.1 video VAE.
        audio_vae ([`~diffusers_wan_ext.AutoencoderDac`]): the DAC audio VAE (48 kHz, hop 960).
        scheduler: a flow-matching scheduler (the release: Euler, shift 5, 50 steps).
        transformer ([`WanTransformer3DModel`]): the high-noise video expert (release ``video_dit/``).
        audio_transformer ([`~diffusers_wan_ext.MovaAudioTransformer1DModel`]): the audio DiT.
        bridge ([`~diffusers_wan_ext.MovaDualTowerBridge`]): the dual-tower bridge.
        transformer_2 ([`WanTransformer3DModel`], *optional*): the low-noise video expert (``video_dit_2/``).
        boundary_ratio (`float`, defaults to 0.9): ``transformer`` runs while ``t >= boundary_ratio * 1000`` (the
            release's ``model_index.json`` field, carried over by the converter).
        audio_vae_type (`str`, defaults to ``"dac"``): the release's ``model_index.json`` field; only ``"dac"``.

    Example:
        >>> import torch
        >>> import diffusers_wan_ext  # noqa: F401  (registers the classes with Diffusers)
        >>> from diffusers import DiffusionPipeline
        >>> pipe = DiffusionPipeline.from_pretrained("converted/MOVA-360p", dtype=torch.bfloat16)  # doctest: +SKIP
        >>> out = pipe(image="cat.png", prompt="two cats boxing", height=352, width=640,  # doctest: +SKIP
        ...            num_frames=121, frame_rate=24)
        >>> out.frames[0].shape, out.audio.shape, out.audio_sample_rate  # doctest: +SKIP
        ((121, 352, 640, 3), (1, 242000), 48000)
    """

    # the audio tower and the bridge run interleaved with the video expert: outside the chain (onloaded once, kept)
    model_cpu_offload_seq = "text_encoder->transformer->transformer_2->vae->audio_vae"
    _optional_components = ["tokenizer", "text_encoder", "transformer_2"]
    supports_cfg_parallel: ClassVar[bool] = False
    #: ``load_lora_weights``: DiffSynth-Studio's MOVA LoRAs are on one video expert (``load_into_transformer_2=True``
    #: for the low-noise one); Diffusers-format files may also carry ``audio_transformer.*`` / ``bridge.*`` keys
    _lora_loadable_modules = ["transformer", "transformer_2", "audio_transformer", "bridge"]
    #: runtime features this pipeline refuses, with the reason
    unsupported: ClassVar[dict[str, str]] = {
        "teacache": "TeaCache skips whole transformer forwards, but MOVA's video and audio towers exchange hidden "
                    "states block by block through the bridge; no calibrated TeaCache coefficients exist for it",
        "sliding_window": "the audio track spans the whole clip and the bridge aligns every video latent frame with "
                          "the audio by absolute time; windows of latent frames would break that alignment",
        "sequence_parallel": "the bridge's cross-modal attention needs both towers' full token sequences at every "
                             "interaction layer",
    }
    sliding_window_unsupported_reason: ClassVar[str] = unsupported["sliding_window"]
    #: dtype of the video and audio latents between steps; ``None``: the video expert's (bf16 for a bf16 pipeline),
    #: as DiffSynth-Studio keeps them in its pipeline dtype (``generate_noise`` casts the float32 noise, the Euler
    #: step runs in it).  ``torch.float32`` would keep them as stock Diffusers pipelines and the original OpenMOSS
    #: code do (the towers then get them cast to their dtype).
    latents_dtype: ClassVar[torch.dtype | None] = None

    encode_prompt = WanPipeline.encode_prompt
    _get_t5_prompt_embeds = WanPipeline._get_t5_prompt_embeds

    def __init__(
        self,
        tokenizer: AutoTokenizer,
        text_encoder: UMT5EncoderModel,
        vae: AutoencoderKLWan,
        audio_vae: AutoencoderDac,
        scheduler: FlowMatchEulerDiscreteScheduler | UniPCMultistepScheduler | WanFlowMatchScheduler,
        transformer: WanTransformer3DModel,
        audio_transformer: MovaAudioTransformer1DModel,
        bridge: MovaDualTowerBridge,
        transformer_2: WanTransformer3DModel | None = None,
        boundary_ratio: float = 0.9,
        audio_vae_type: str = "dac",
    ) -> None:
        check_mova_pipeline_fields(boundary_ratio, audio_vae_type, type(self).__name__)
        super().__init__()
        self.register_modules(
            tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, audio_vae=audio_vae, scheduler=scheduler,
            transformer=transformer, audio_transformer=audio_transformer, bridge=bridge, transformer_2=transformer_2,
        )
        self.register_to_config(boundary_ratio=boundary_ratio, audio_vae_type=audio_vae_type)
        self.vae_scale_factor_temporal = self.vae.config.scale_factor_temporal if getattr(self, "vae", None) else 4
        self.vae_scale_factor_spatial = self.vae.config.scale_factor_spatial if getattr(self, "vae", None) else 8
        self.video_processor = VideoProcessor(vae_scale_factor=self.vae_scale_factor_spatial)

    # -------------------------------------------------------------------------------------------- refusals
    def enable_teacache(self, *args, **kwargs) -> None:
        """Refused: see :attr:`unsupported`."""
        raise ValueError(f"MovaPipeline does not support TeaCache: {self.unsupported['teacache']}")

    def enable_parallelism(self, *args, **kwargs):
        """Refused: see :attr:`unsupported`."""
        raise ValueError(f"MovaPipeline does not support sequence / CFG parallelism: "
                         f"{self.unsupported['sequence_parallel']}")

    # ---------------------------------------------------------------------------------------------- checks
    def check_mova_inputs(self, image, prompt, prompt_embeds, height: int, width: int, num_frames: int,
                          frame_rate: float, num_inference_steps: int, guidance_scale: float, output_type: str) -> None:
        """One-line ``ValueError`` naming the argument, before any model runs."""
        if image is None:
            raise ValueError("image is required: MOVA generates video and audio from an image (a PIL image or a path)")
        if prompt is None and prompt_embeds is None:
            raise ValueError("pass prompt (a string) or prompt_embeds")
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("pass prompt or prompt_embeds, not both")
        check_positive_ints(height=height, width=width, num_inference_steps=num_inference_steps)
        factor = self.vae_scale_factor_spatial * 2
        if height % factor or width % factor:
            raise ValueError(f"height and width must be multiples of {factor}; got height={height}, width={width}")
        check_frame_count(num_frames, self.vae_scale_factor_temporal)
        if not isinstance(frame_rate, (int, float)) or isinstance(frame_rate, bool) or not frame_rate > 0:
            raise ValueError(f"frame_rate must be a positive number of frames per second; got {frame_rate!r}")
        if not guidance_scale >= 0:
            raise ValueError(f"guidance_scale must be >= 0; got {guidance_scale!r}")
        if output_type not in ("np", "pt", "pil", "latent"):
            raise ValueError(f"output_type must be 'np', 'pt', 'pil' or 'latent'; got {output_type!r}")
        if self.audio_transformer.config.in_channels != self.audio_vae.config.latent_dim:
            raise ValueError(f"audio_transformer takes {self.audio_transformer.config.in_channels} channels but "
                             f"audio_vae has {self.audio_vae.config.latent_dim} latent channels")

    # --------------------------------------------------------------------------------------------- helpers
    def expert(self, t: torch.Tensor, boundary_ratio: float) -> WanTransformer3DModel:
        """The video expert of timestep ``t``: ``transformer`` while ``t >= boundary * 1000``, else
        ``transformer_2`` (when there is one)."""
        if self.transformer_2 is not None and float(t) < boundary_ratio * 1000:
            return self.transformer_2
        return self.transformer

    def audio_length(self, num_frames: int, frame_rate: float) -> int:
        """Audio latents of a clip (:func:`mova_audio_length` with the audio VAE's rate and hop)."""
        return mova_audio_length(num_frames, frame_rate, self.audio_vae.config.sample_rate, self.audio_vae.hop_length)

    def prepare_latents(self, y: torch.Tensor, num_frames: int, frame_rate: float, latents: torch.Tensor | None,
                        audio_latents: torch.Tensor | None, generator: torch.Generator | None,
                        dtype: torch.dtype = torch.float32):
        """Video latents ``[1, z, F, h, w]`` (the grid of ``y``) and audio latents ``[1, C, L]`` in ``dtype``: the
        given ones (shape checked) or noise, DiffSynth-Studio's rule: float32 ``randn``, video then audio, each drawn
        from ``generator``'s state at this call (a CPU generator draws on the CPU, as DiffSynth's
        ``rand_device="cpu"``), then cast."""
        video_shape = (1, self.vae.config.z_dim, *y.shape[2:])
        audio_shape = (1, self.audio_vae.config.latent_dim, self.audio_length(num_frames, frame_rate))
        start = copy_generator(generator)  # both draws begin here: DiffSynth re-seeds for each
        out = []
        for name, given, shape in (("latents", latents, video_shape), ("audio_latents", audio_latents, audio_shape)):
            if given is not None and tuple(given.shape) != shape:
                raise ValueError(f"{name} must have shape {shape} for these inputs; got {tuple(given.shape)}")
            noise = given if given is not None else seeded_noise(shape, start, y.device)
            out.append(noise.to(device=y.device, dtype=dtype))
        return tuple(out)

    def decode_audio(self, audio_latents: torch.Tensor) -> torch.Tensor:
        """Waveform ``[B, samples]`` float32 of audio latents ``[B, C, L]``."""
        device = get_module_execution_device(self.audio_vae)
        wav = self.audio_vae.decode(audio_latents.to(device=device, dtype=self.audio_vae.dtype)).sample
        return wav[:, 0].float().cpu()

    def _guided(self, expert, video, audio, t, context, negative_context, y, frame_rate, guidance_scale):
        kwargs = dict(frame_rate=frame_rate, image_condition=y)
        v, a = mova_joint_forward(expert, self.audio_transformer, self.bridge, video, audio, t, context, **kwargs)
        if negative_context is None:
            return v, a
        v_u, a_u = mova_joint_forward(expert, self.audio_transformer, self.bridge, video, audio, t, negative_context,
                                      **kwargs)
        return v_u + guidance_scale * (v - v_u), a_u + guidance_scale * (a - a_u)

    def _step(self, v_pred, a_pred, t, i, video, audio):
        """One step of both latents, kept in their dtype.  With the release's :class:`WanFlowMatchScheduler` it is
        DiffSynth-Studio's ``FlowMatchScheduler.step`` ``sample + model_output * (sigma_next - sigma)`` in the
        latents' dtype (in bf16 the product is rounded before the sum, as there); another scheduler steps both at
        once in float32 (flattened together: its step index advances once)."""
        if isinstance(self.scheduler, WanFlowMatchScheduler):
            dt = self.scheduler.sigmas[i + 1] - self.scheduler.sigmas[i]  # float32 on the CPU, as DiffSynth's
            return video + v_pred.to(video.dtype) * dt, audio + a_pred.to(audio.dtype) * dt
        n = video.numel()
        pred = torch.cat([v_pred.flatten(), a_pred.flatten()]).float()
        sample = torch.cat([video.flatten(), audio.flatten()]).float()
        out = self.scheduler.step(pred, t, sample, return_dict=False)[0]
        return out[:n].view_as(video).to(video.dtype), out[n:].view_as(audio).to(audio.dtype)

    # ------------------------------------------------------------------------------------------------ call
    @torch.no_grad()
    def __call__(
        self,
        image: PipelineImageInput | str,
        prompt: str | None = None,
        negative_prompt: str | None = None,
        height: int = 352,
        width: int = 640,
        num_frames: int = 121,
        frame_rate: float = 24.0,
        num_inference_steps: int = 50,
        guidance_scale: float = 5.0,
        boundary_ratio: float | None = None,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        audio_latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        max_sequence_length: int = 512,
        output_type: str = "np",
        return_dict: bool = True,
        callback_on_step_end: Callable[[Any, int, torch.Tensor, dict], dict] | None = None,
    ) -> MovaPipelineOutput | tuple:
        """Generate a video and its audio from ``image`` and ``prompt``.

        Args:
            image: the first frame (PIL image, file path, numpy ``[H, W, 3]``); resized to ``height x width``.
            prompt / negative_prompt: text (or ``prompt_embeds`` / ``negative_prompt_embeds``).
            height, width: multiples of 16 (the release: 352 x 640 for 360p, 720 x 1280 for 720p).
            num_frames: ``4k + 1`` frames.
            frame_rate: video frames per second (sets the audio length and the bridge's time alignment).
            num_inference_steps, guidance_scale: sampling (one scale for video and audio; any value but 1 runs the
                negative branch, as DiffSynth-Studio does).
            boundary_ratio: expert switch (default: the pipeline's config, 0.9).
            generator, latents, audio_latents: noise control (latents: ``[1, 16, F, H/8, W/8]``, ``[1, 128, L]``);
                the video and the audio noise are both drawn from ``generator``'s state at the call (DiffSynth's
                rule: a CPU ``torch.Generator().manual_seed(seed)`` gives DiffSynth's noise for ``seed``).
            max_sequence_length: umT5 tokens (512 as the release).
            output_type: "np", "pt", "pil" or "latent".
            callback_on_step_end: ``fn(pipe, step, t, {"latents", "audio_latents"}) -> dict`` (may replace them).
        """
        self.check_mova_inputs(image, prompt, prompt_embeds, height, width, num_frames, frame_rate,
                               num_inference_steps, guidance_scale, output_type)
        boundary = self.config.boundary_ratio if boundary_ratio is None else float(boundary_ratio)
        device = self._execution_device
        dtype = self.transformer.dtype
        self._guidance_scale = guidance_scale
        pixels = load_image(image, height, width)

        context, negative_context = self.encode_prompt(
            prompt=prompt, negative_prompt=negative_prompt, do_classifier_free_guidance=guidance_scale != 1.0,
            num_videos_per_prompt=1, prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
            max_sequence_length=max_sequence_length, device=device,
        )
        context = context.to(dtype)
        negative_context = negative_context.to(dtype) if guidance_scale != 1.0 else None
        y = i2v_condition(self.vae, pixels, num_frames).to(device=device, dtype=dtype)

        latents_dtype = self.latents_dtype or dtype
        video, audio = self.prepare_latents(y, num_frames, frame_rate, latents, audio_latents, generator,
                                            latents_dtype)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        with self.progress_bar(total=len(self.scheduler.timesteps)) as bar:
            for i, t in enumerate(self.scheduler.timesteps):
                # the towers get the timestep in their dtype (bf16 rounds it, as DiffSynth's loop does)
                v_pred, a_pred = self._guided(self.expert(t, boundary), video.to(dtype), audio.to(dtype),
                                              t.expand(1).to(device, dtype), context, negative_context, y,
                                              float(frame_rate), guidance_scale)
                video, audio = self._step(v_pred, a_pred, t, i, video, audio)
                if callback_on_step_end is not None:
                    out = callback_on_step_end(self, i, t, {"latents": video, "audio_latents": audio}) or {}
                    video, audio = out.get("latents", video), out.get("audio_latents", audio)
                bar.update()

        if output_type == "latent":
            frames, wav = video, audio
        else:
            frames = self.decode_latents(video, output_type=output_type)
            wav = self.decode_audio(audio)
            if output_type != "pt":
                wav = wav.numpy().astype(np.float32)
        self.maybe_free_model_hooks()
        rate = int(self.audio_vae.config.sample_rate)
        if not return_dict:
            return frames, wav, rate
        return MovaPipelineOutput(frames=frames, audio=wav, audio_sample_rate=rate)
