"""``WanDancerPipeline``: Wan2.2-Dancer-14B -- a dance video of a reference image, driven by music.

The release's two DiTs run one after the other, as DiffSynth-Studio's Wan-Dancer examples do:

1. **Global stage** (``transformer`` = ``global_model``): keyframes at ``keyframe_fps`` (7.5).  The model input is a
   ``4 (n - 1) + 1``-frame video at 7.5 fps whose first frame is the reference image and the rest black (keyframe
   mask ``[1, 0, ...]``), the CLIP tokens of the reference image (first keyframe and ``reference_image_embeds``), and
   the music features of ``(4 (n - 1) + 1) / 7.5`` seconds; the ``n`` latent frames are decoded one by one
   (DiffSynth's ``framewise_decoding``): keyframe ``i`` is at ``4 i / keyframe_fps`` seconds.
2. **Local stage** (``transformer_2`` = ``local_model``): 30-fps segments of ``segment_frames`` frames, each
   conditioned on the keyframes that fall inside it (at frame ``round(30 t)``) and, from the second segment on, on the
   previous segment's last frame as its first keyframe (segments overlap by that one frame); CLIP of the segment's
   first keyframe, the reference image's CLIP tokens and the segment's music features.

Both stages sample with classifier-free guidance whose negative branch skips DiT block 9
(:data:`~diffusers_wan_ext.models.transformer_wan_dancer.DANCER_UNCOND_SKIP_BLOCKS`), as the reference does for this
model.  As in DiffSynth's examples (one ``pipe(seed=...)`` call per stage and per segment, each re-seeding a CPU
generator): the global stage and every local segment draw their float32 noise from the generator's state at the
start of the call (:mod:`~diffusers_wan_ext.pipelines.seeded_noise`), and the timestep reaches the DiT in its dtype
(bf16 rounds it, as DiffSynth's ``timestep.to(torch_dtype)``).  A folder with one DiT runs one stage: the keyframes (no ``keyframes`` given) or the 30-fps rendering of given
``keyframes``.  Music features: :mod:`~diffusers_wan_ext.pipelines.dancer_conditioning` (librosa, as the reference).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DiffusionPipeline
from diffusers.image_processor import PipelineImageInput
from diffusers.models import AutoencoderKLWan
from diffusers.pipelines.wan.pipeline_wan import WanPipeline
from diffusers.schedulers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import get_module_execution_device
from diffusers.video_processor import VideoProcessor
from transformers import AutoTokenizer, CLIPImageProcessor, CLIPVisionModel, UMT5EncoderModel

from ..conversion.image_encoder import clip_image_features, wan_clip_preprocess
from ..lora.loader import WanLoraInteropMixin
from ..models.transformer_wan_dancer import DANCER_NATIVE_FPS, DANCER_UNCOND_SKIP_BLOCKS, WanDancerTransformer3DModel
from ..schedulers import WanFlowMatchScheduler
from ..utils.media import encode_video, load_image
from ..utils.shims import ShimPipelineMixin
from .dancer_conditioning import FEATURE_FPS, keyframe_condition, music_features, slice_music
from .denoising import WanDenoisingMixin
from .runtime_options import WanRuntimeOptionsMixin
from .seeded_noise import copy_generator, seeded_noise

__all__ = ["WanDancerPipeline", "WanDancerPipelineOutput"]


@dataclass
class WanDancerPipelineOutput(BaseOutput):
    """``frames``: the dance video ``[1, N, H, W, 3]`` (``output_type="np"``; 30 fps after the local stage, the
    keyframe rate otherwise); ``keyframes``: the keyframes ``[n, 3, H, W]`` in [-1, 1] the local stage used."""

    frames: Any
    keyframes: torch.Tensor | None = None


class WanDancerPipeline(
    ShimPipelineMixin, WanLoraInteropMixin, WanRuntimeOptionsMixin, WanDenoisingMixin, DiffusionPipeline
):
    r"""
    Music-driven dance video with Wan2.2-Dancer-14B: global keyframes at 7.5 fps, then 30-fps local segments.

    Args:
        tokenizer ([`AutoTokenizer`]), text_encoder ([`UMT5EncoderModel`]): umT5 (optional with ``prompt_embeds``).
        vae ([`AutoencoderKLWan`]): the Wan2.1 VAE.
        scheduler: a flow-matching scheduler (the reference: Euler, shift 5).
        image_encoder ([`CLIPVisionModel`]): the Wan CLIP image encoder.
        transformer ([`~diffusers_wan_ext.models.WanDancerTransformer3DModel`]): the global model (or the only one).
        transformer_2 ([`~diffusers_wan_ext.models.WanDancerTransformer3DModel`], *optional*): the local model.
        image_processor ([`CLIPImageProcessor`], *optional*): unused (CLIP input is preprocessed as Wan does); kept
            so converted folders that list it load.

    Example:
        >>> import torch, diffusers_wan_ext  # noqa: F401
        >>> from diffusers import DiffusionPipeline
        >>> pipe = DiffusionPipeline.from_pretrained("Wan-Dancer-14B-diffusers", dtype=torch.bfloat16)  # doctest: +SKIP
        >>> video = pipe(image="dancer.png", music="music.wav", prompt="a person is dancing").frames[0]  # doctest: +SKIP
    """

    model_cpu_offload_seq = "text_encoder->image_encoder->transformer->transformer_2->vae"
    _callback_tensor_inputs = ["latents"]
    _optional_components = ["tokenizer", "text_encoder", "transformer_2", "image_processor"]
    supports_cfg_parallel = False
    cfg_batching = False  # the negative branch skips block 9: a different graph, never one batch with the positive
    sliding_window_unsupported_reason = "the music tokens and the keyframe RoPE span the whole clip"

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
        image_encoder: CLIPVisionModel,
        transformer: WanDancerTransformer3DModel,
        transformer_2: WanDancerTransformer3DModel | None = None,
        image_processor: CLIPImageProcessor | None = None,
    ) -> None:
        super().__init__()
        self.register_modules(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                              image_encoder=image_encoder, transformer=transformer, transformer_2=transformer_2,
                              image_processor=image_processor)
        self.vae_scale_factor_temporal = self.vae.config.scale_factor_temporal if getattr(self, "vae", None) else 4
        self.vae_scale_factor_spatial = self.vae.config.scale_factor_spatial if getattr(self, "vae", None) else 8
        self.video_processor = VideoProcessor(vae_scale_factor=self.vae_scale_factor_spatial)

    def enable_teacache(self, *args, **kwargs) -> None:
        """Not available for Wan-Dancer: the music injections run between the DiT blocks (a cached block residual
        would still add them on skipped steps) and no reference TeaCache coefficients exist for this model."""
        raise NotImplementedError(
            "TeaCache is not supported for Wan-Dancer (music injections between the DiT blocks; no reference "
            "coefficients); use set_attention_backend() / enable_vram_management() for speed and memory instead"
        )

    def enable_parallelism(self, *args, **kwargs):
        """Not available for Wan-Dancer: sequence parallel cannot split the tokens (the music injection groups each
        latent frame's tokens with that frame's music tokens, resampled over the whole clip; see the transformer's
        ``_cp_unsupported_reason``), and the two guidance branches run different blocks (block 9 is skipped in the
        negative one), so there is no CFG-parallel split either."""
        raise NotImplementedError(
            "Wan-Dancer cannot run in parallel: sequence parallel would split the per-frame music injection (music "
            "tokens resampled over the whole clip), and the guidance branches run different blocks (CFG parallel); "
            "run it on one GPU (enable_vram_management() to fit it)"
        )

    # ------------------------------------------------------------------------------------------------ parts
    def clip_features(self, images: torch.Tensor) -> torch.Tensor:
        """Wan CLIP features ``[B, 257, clip_dim]`` of images ``[B, 3, H, W]`` in [-1, 1]."""
        size = self.image_encoder.config.image_size
        return clip_image_features(self.image_encoder, wan_clip_preprocess(images.float(), size))

    def decode(self, latents: torch.Tensor, framewise: bool = False) -> torch.Tensor:
        """Normalised latents ``[1, z, T, h, w]`` -> pixels ``[1, 3, F, H, W]`` in [-1, 1] (float32); ``framewise``:
        every latent frame decoded alone (one frame each, the reference's ``decode_framewise``)."""
        if framewise:
            return torch.cat([self.decode(latents[:, :, i : i + 1]) for i in range(latents.shape[2])], dim=2)
        device, z = latents.device, self.vae.config.z_dim
        latents = latents.to(device=get_module_execution_device(self.vae), dtype=self.vae.dtype)
        mean = torch.tensor(self.vae.config.latents_mean).view(1, z, 1, 1, 1).to(latents)
        std = torch.tensor(self.vae.config.latents_std).view(1, z, 1, 1, 1).to(latents)
        return self.vae.decode(latents * std + mean, return_dict=False)[0].float().clamp(-1, 1).to(device)

    def _stage(self, model, keyframe_video: torch.Tensor, mask: torch.Tensor, reference: torch.Tensor,
               music: torch.Tensor, fps: float, text: tuple, steps: int, generator, device) -> torch.Tensor:
        """One DiT stage: the latents of a ``keyframe_video`` ``[1, 3, F, H, W]`` (``mask`` ``[F]``: 1 at keyframes)."""
        dtype = model.dtype
        vae_latents = encode_video(self.vae, keyframe_video).to(device=device, dtype=torch.float32)
        y = keyframe_condition(vae_latents, mask, self.vae_scale_factor_temporal).to(dtype)
        kwargs = dict(encoder_hidden_states_image=self.clip_features(keyframe_video[:, :, 0]).to(device, dtype),
                      reference_image_embeds=reference.to(device, dtype), music_features=music.to(device, dtype),
                      fps=float(fps))
        latents = seeded_noise(tuple(vae_latents.shape), generator, device)  # from the call's starting state
        self.scheduler.set_timesteps(steps, device=device)
        return self.denoise(
            latents, self.scheduler.timesteps, prompt_embeds=text[0], negative_prompt_embeds=text[1],
            guidance_scale=self._guidance_scale, num_inference_steps=steps, transformer_dtype=dtype,
            attention_kwargs=self._attention_kwargs, cfg_batching=False, transformer=model,
            model_input=lambda x: torch.cat([x.to(dtype), y], dim=1), transformer_kwargs=kwargs,
            timestep_of=lambda t, x: t.expand(x.shape[0]).to(dtype),  # bf16 rounds it, as DiffSynth does
            uncond_transformer_kwargs={"skip_blocks": DANCER_UNCOND_SKIP_BLOCKS},
        )

    def _check(self, image, music, music_features_, keyframes, height: int, width: int, keyframe_fps: float,
               segment_frames: int) -> None:
        multiple = self.vae_scale_factor_spatial * self.transformer.config.patch_size[1]
        if height <= 0 or width <= 0 or height % multiple or width % multiple:
            raise ValueError(f"height and width must be positive multiples of {multiple}, got {height}x{width}")
        if image is None:
            raise ValueError("pass `image`: the reference image of the dancer (a PIL image, path or array)")
        if (music is None) == (music_features_ is None):
            raise ValueError("pass exactly one of `music` (an audio file) and `music_features` ([frames, 35] at 30 "
                             "frames per second)")
        if not keyframe_fps > 0 or int(keyframe_fps + 0.5) == DANCER_NATIVE_FPS:
            raise ValueError(f"keyframe_fps must be positive and not {DANCER_NATIVE_FPS} (the local rate), got "
                             f"{keyframe_fps!r}")
        t = self.vae_scale_factor_temporal
        if isinstance(segment_frames, bool) or not isinstance(segment_frames, int) or segment_frames < t + 1 or (
                (segment_frames - 1) % t):
            raise ValueError(f"segment_frames must be {t} k + 1 (k >= 1; the release uses 149), got {segment_frames!r}")
        if keyframes is not None and (not torch.is_tensor(keyframes) or keyframes.ndim != 4 or keyframes.shape[1] != 3):
            raise ValueError("keyframes must be a tensor [n, 3, H, W] in [-1, 1] (a previous call's `keyframes`)")

    # ------------------------------------------------------------------------------------------ generation
    def _keyframes(self, ref: torch.Tensor, feats: torch.Tensor, seconds: float, keyframe_fps: float, ref_clip,
                   text, steps: int, generator, device) -> torch.Tensor:
        """Global stage: keyframes ``[n, 3, H, W]`` for ``seconds`` of music."""
        t = self.vae_scale_factor_temporal
        count = max(2, int((seconds * keyframe_fps - 1) // t) + 1)
        frames = t * (count - 1) + 1
        video = torch.full((1, 3, frames, *ref.shape[-2:]), -1.0)
        video[:, :, 0] = ref[0]
        mask = torch.zeros(frames)
        mask[0] = 1
        music = slice_music(feats, 0.0, frames / keyframe_fps)
        latents = self._stage(self.transformer, video, mask, ref_clip, music, keyframe_fps, text, steps, generator,
                              device)
        return self.decode(latents, framewise=True)[0].transpose(0, 1)

    def _render(self, model, keyframes: torch.Tensor, feats: torch.Tensor, keyframe_fps: float, segment_frames: int,
                ref_clip, text, steps: int, generator, device) -> torch.Tensor:
        """Local stage: 30-fps frames ``[3, N, H, W]`` through every keyframe, segment after segment."""
        t = self.vae_scale_factor_temporal
        positions = [int(round(t * i / keyframe_fps * DANCER_NATIVE_FPS)) for i in range(keyframes.shape[0])]
        total = positions[-1] + 1
        stride = segment_frames - 1
        out: list[torch.Tensor] = []
        for index in range(max(1, math.ceil((total - 1) / stride))):
            start = index * stride
            video = torch.full((1, 3, segment_frames, *keyframes.shape[-2:]), -1.0)
            mask = torch.zeros(segment_frames)
            for k, p in enumerate(positions):
                if 0 <= p - start < segment_frames:
                    video[:, :, p - start], mask[p - start] = keyframes[k], 1
            if out:  # continuity: the previous segment's last frame is this one's first keyframe
                video[:, :, 0], mask[0] = out[-1][:, -1], 1
            music = slice_music(feats, start / FEATURE_FPS, segment_frames / FEATURE_FPS)
            latents = self._stage(model, video, mask, ref_clip, music, DANCER_NATIVE_FPS, text, steps, generator,
                                  device)
            frames = self.decode(latents)[0]
            out.append(frames if not out else frames[:, 1:])
        return torch.cat(out, dim=1)[:, :total]

    @torch.no_grad()
    def __call__(
        self,
        image: PipelineImageInput,
        music: str | None = None,
        prompt: str | None = None,
        negative_prompt: str | None = None,
        local_prompt: str | None = None,
        height: int = 1280,
        width: int = 720,
        duration: float | None = None,
        keyframe_fps: float = 7.5,
        segment_frames: int = 149,
        num_inference_steps: int = 48,
        local_num_inference_steps: int = 24,
        guidance_scale: float = 5.0,
        generator: torch.Generator | None = None,
        music_features: torch.Tensor | None = None,
        keyframes: torch.Tensor | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        max_sequence_length: int = 512,
    ) -> WanDancerPipelineOutput | tuple:
        r"""
        Generate a dance video of ``image`` to ``music``.

        Args:
            image: the reference image (PIL image, path, numpy ``[H, W, 3]`` or tensor in [-1, 1]); PIL images are
                resized to ``width x height`` (multiples of 16).
            music (`str`): the music file (wav / mp3 / flac ...; read like the S2V pipeline's audio).  Or pass
                ``music_features``.
            prompt (`str`): the prompt of both stages (the release's prompts name the dance style and frame rate).
            negative_prompt (`str`, *optional*): the negative prompt of both stages.
            local_prompt (`str`, *optional*): the prompt of the local stage (default: ``prompt``).
            duration (`float`, *optional*): seconds to dance (default: the whole music).
            keyframe_fps (`float`, defaults to 7.5): the global model's frame rate (keyframe ``i`` at ``4 i /
                keyframe_fps`` s).
            segment_frames (`int`, defaults to 149): frames per local segment (``4 k + 1``).
            num_inference_steps (`int`, defaults to 48), local_num_inference_steps (`int`, defaults to 24): steps of
                the global / local stage (DiffSynth's examples).
            guidance_scale (`float`, defaults to 5.0): CFG of both stages (negative branch: block 9 skipped).
            generator (`torch.Generator`, *optional*): the noise of the global stage and of every local segment is
                drawn from its state at the start of the call (DiffSynth's examples: ``seed=`` per stage and segment;
                a CPU ``torch.Generator().manual_seed(seed)`` gives DiffSynth's noise for ``seed``).
            music_features (`torch.Tensor`, *optional*): precomputed features ``[frames, 35]`` at 30 per second.
            keyframes (`torch.Tensor`, *optional*): keyframes ``[n, 3, H, W]`` in [-1, 1] (a previous output's
                ``keyframes``): skip the global stage.
            output_type (`str`, defaults to ``"np"``): ``"np"``, ``"pil"`` or ``"pt"``.
        """
        self._check(image, music, music_features, keyframes, height, width, keyframe_fps, segment_frames)
        self._guidance_scale, self._attention_kwargs, self._interrupt = guidance_scale, attention_kwargs, False
        device = self._execution_device
        ref = load_image(image, height, width)
        feats = music_features.float().cpu() if music_features is not None else music_features_of(music)
        seconds = float(duration) if duration is not None else feats.shape[0] / FEATURE_FPS
        if not 0 < seconds <= feats.shape[0] / FEATURE_FPS + 1e-6:
            raise ValueError(f"duration must be in (0, {feats.shape[0] / FEATURE_FPS:.2f}] s (the music's length), "
                             f"got {duration!r}")
        dtype = self.transformer.dtype
        texts = [self.encode_text(p, negative_prompt, None, None, num_videos_per_prompt=1,
                                  max_sequence_length=max_sequence_length, dtype=dtype, device=device)
                 for p in (prompt or "", local_prompt or prompt or "")]
        ref_clip = self.clip_features(ref.to(device))
        local = self.transformer_2 if self.transformer_2 is not None else (
            self.transformer if keyframes is not None else None)
        start = copy_generator(generator)  # every stage and segment starts from here (DiffSynth re-seeds per call)
        if keyframes is None:
            keyframes = self._keyframes(ref, feats, seconds, keyframe_fps, ref_clip, texts[0], num_inference_steps,
                                        start, device)
        video = keyframes.transpose(0, 1)
        if local is not None:
            video = self._render(local, keyframes.cpu().float(), feats, keyframe_fps, segment_frames, ref_clip,
                                 texts[1], local_num_inference_steps, start, device)
        frames = video.unsqueeze(0) if output_type == "pt" else self.video_processor.postprocess_video(
            video.unsqueeze(0), output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (frames,)
        return WanDancerPipelineOutput(frames=frames, keyframes=keyframes)


def music_features_of(music: Any) -> torch.Tensor:
    """The music features of a file (:func:`~.dancer_conditioning.music_features`) with a one-line error for non-paths."""
    if not isinstance(music, (str, bytes)) and not hasattr(music, "__fspath__"):
        raise ValueError(f"music must be a path to an audio file, got {type(music).__name__}")
    return music_features(music)
