"""``WanStreamingPipeline``: autoregressive, block-by-block text-to-video for Self-Forcing-distilled Wan models
(krea/krea-realtime-video, a distilled Wan2.1-T2V-14B), with frames available while the rest is still generated.

How a video is made (krea's ``CausalInferencePipeline`` / realtime server, on stock Diffusers components):

1. the prompt is encoded once; the text keys / values of every cross-attention are projected once;
2. for each block of ``num_frames_per_block`` latent frames (krea: 3):

   a. start from fresh Gaussian noise and run the few-step distilled schedule (:func:`self_forcing_schedule`;
      krea's realtime default: 4 steps of shift 5) -- at each step the transformer predicts the velocity ``v``,
      the clean block is ``x0 = x_t - sigma_t * v``, and unless it is the last step the block is re-noised to the
      next step's ``sigma``: ``x = (1 - sigma') x0 + sigma' eps`` (each block runs through the shared loop,
      :meth:`~diffusers_wan_ext.pipelines.denoising.WanDenoisingMixin.denoise`, with this step).  Self-attention is
      *block-causal*: the block attends to itself and to the cached keys / values of the blocks before it
      (:mod:`diffusers_wan_ext.hooks.block_causal`);
   b. the clean block is decoded by :class:`~diffusers_wan_ext.vae.streaming.WanStreamingVAEDecoder`, which
      keeps the VAE's causal feature cache across blocks (nothing is decoded twice) -- and yielded;
   c. the clean block is run once more at the clean timestep (``context_timestep``, 0) to put its keys / values into
      the cache for the next blocks (the reference's "rerun with timestep zero to update KV cache").

:meth:`WanStreamingPipeline.stream` is a generator of :class:`WanStreamChunk` (frames of one block each);
``__call__`` collects the chunks into a stock :class:`~diffusers.pipelines.wan.pipeline_output.WanPipelineOutput`.

The transformer is the stock :class:`diffusers.WanTransformer3DModel` the converter writes for krea's checkpoint
(``diffusers-wan convert krea-realtime-video-14b.safetensors ...``); the pipeline has the components of stock
``WanPipeline`` and loads from the same folder (``WanStreamingPipeline.from_pretrained(folder)``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
from diffusers.models import AutoencoderKLWan, WanTransformer3DModel
from diffusers.pipelines.wan.pipeline_output import WanPipelineOutput
from diffusers.pipelines.wan.pipeline_wan import WanPipeline
from diffusers.schedulers import FlowMatchEulerDiscreteScheduler
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import get_module_execution_device, randn_tensor
from transformers import AutoTokenizer, UMT5EncoderModel

from ..utils.shims import ShimPipelineMixin
from ..hooks.block_causal import disable_block_causal_cache, enable_block_causal_cache
from ..vae import WanStreamingVAEDecoder
from ..utils.validation import validate_video_size
from .call_arguments import forwarded
from .denoising import WanDenoisingMixin
from .runtime_options import WanRuntimeOptionsMixin

__all__ = ["WanStreamChunk", "WanStreamingPipeline", "self_forcing_schedule"]

OUTPUT_TYPES = ("np", "pt", "pil", "latent")


def self_forcing_schedule(
    num_inference_steps: int = 4, shift: float = 5.0, denoising_strength: float = 1.0, num_train_timesteps: int = 1000
) -> tuple[torch.Tensor, torch.Tensor]:
    """Timesteps and sigmas of the few-step schedule of krea's realtime release (Self-Forcing).

    The reference builds a table of ``num_train_timesteps`` shifted sigmas ``s(u) = shift u / (1 + (shift - 1) u)``
    for ``u = linspace(1, 0, T + 1)[:-1]`` (timesteps ``1000 s``, plus a trailing 0), picks the entries
    ``T - int(linspace(strength * T, 0, N))`` as the timesteps, and uses for each timestep the sigma of the nearest
    table entry (so timestep 0, the last step, keeps the smallest table sigma, 0.005 for shift 5).  With shift 5,
    ``N = 4`` (the realtime server's "4 steps for performance") gives timesteps ``[1000, 908.8, 714.0, 0]``;
    ``N = 5`` (its default) gives ``[1000, 937.5, 833.3, 625, 0]``, the ``denoising_step_list`` of krea's 14B config.

    Example:
        >>> t, s = self_forcing_schedule(4)
        >>> [round(float(x), 1) for x in t], round(float(s[-1]), 4)
        ([1000.0, 908.8, 714.0, 0.0], 0.005)
    """
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    if not 0 < denoising_strength <= 1:
        raise ValueError(f"denoising_strength must be in (0, 1], got {denoising_strength}")
    T = int(num_train_timesteps)
    u = torch.linspace(1.0, 0.0, T + 1)[:-1]
    sigmas = shift * u / (1 + (shift - 1) * u)
    table = sigmas * T
    padded = torch.cat([table, table.new_zeros(1)])
    index = T - torch.linspace(denoising_strength * T, 0, num_inference_steps, dtype=torch.float32).to(torch.long)
    timesteps = padded[index]
    nearest = (table[None, :] - timesteps[:, None]).abs().argmin(dim=1)
    return timesteps, sigmas[nearest]


@dataclass
class WanStreamChunk(BaseOutput):
    """One block of a streamed video.

    Attributes:
        frames: the block's decoded frames, ``[B, n, H, W, 3]`` (``"np"``), ``[B, n, 3, H, W]`` (``"pt"``), a list
            of ``B`` lists of PIL images (``"pil"``), or ``None`` (``"latent"``).
        latents: the block's denoised latents ``[B, z_dim, frames_per_block, h, w]`` (normalized).
        block_index: 0, 1, ...
        frame_index: index of the block's first frame in the whole video.
        elapsed: seconds since the stream started when the chunk was ready (time to first frame for block 0).
    """

    frames: Any
    latents: torch.Tensor
    block_index: int
    frame_index: int
    elapsed: float


class WanStreamingPipeline(ShimPipelineMixin, WanRuntimeOptionsMixin, WanDenoisingMixin, WanPipeline):
    r"""
    Streaming (autoregressive, block-causal) text-to-video for Self-Forcing-distilled Wan models such as
    krea/krea-realtime-video.

    Components are those of :class:`diffusers.WanPipeline` (a converted krea folder loads as is); ``scheduler`` is kept
    for ``WanPipeline`` compatibility -- streaming uses the distilled schedule of :func:`self_forcing_schedule`.

    Args:
        tokenizer ([`AutoTokenizer`]), text_encoder ([`UMT5EncoderModel`]): umT5 (may be ``None`` with
            ``prompt_embeds``).
        vae ([`AutoencoderKLWan`]): decodes each block as soon as it is denoised.
        scheduler: unused by :meth:`stream` (see above).
        transformer ([`WanTransformer3DModel`]): a text-to-video Wan DiT trained block-causally.
        transformer_2, boundary_ratio, expand_timesteps: stock ``WanPipeline`` arguments; streaming needs one
            expert and no per-token timesteps (``None`` / ``None`` / ``False``).

    Example:
        >>> import torch
        >>> from diffusers.utils import export_to_video
        >>> from diffusers_wan_ext import WanStreamingPipeline
        >>> pipe = WanStreamingPipeline.from_pretrained("krea-realtime-video-diffusers",  # doctest: +SKIP
        ...                                             dtype=torch.bfloat16).to("cuda")
        >>> frames = []
        >>> for chunk in pipe.stream("a cat surfing a wave at sunset", num_blocks=9):  # doctest: +SKIP
        ...     frames.extend(chunk.frames[0])  # show / send each block's frames right away
        >>> export_to_video(frames, "stream.mp4", fps=16)  # doctest: +SKIP
    """

    #: No classifier-free guidance (the distilled model runs one forward per step): nothing to split over ranks.
    supports_cfg_parallel = False
    supports_sequence_parallel = False  # its block-causal KV-cache attention does not run under context parallelism
    #: The shared default; without guidance there is nothing to batch.
    cfg_batching = True
    sliding_window_unsupported_reason = (
        "it generates block by block with a KV cache of the earlier blocks (num_blocks x num_frames_per_block "
        "latent frames), so each forward already sees one block only"
    )

    def __init__(
        self,
        tokenizer: AutoTokenizer,
        text_encoder: UMT5EncoderModel,
        vae: AutoencoderKLWan,
        scheduler: FlowMatchEulerDiscreteScheduler,
        transformer: WanTransformer3DModel | None = None,
        transformer_2: WanTransformer3DModel | None = None,
        boundary_ratio: float | None = None,
        expand_timesteps: bool = False,
    ) -> None:
        super().__init__(
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            vae=vae,
            scheduler=scheduler,
            transformer=transformer,
            transformer_2=transformer_2,
            boundary_ratio=boundary_ratio,
            expand_timesteps=expand_timesteps,
        )

    # --------------------------------------------------------------------------------------------- checks
    def check_stream_inputs(self, prompt, prompt_embeds, num_blocks, num_frames_per_block, height, width,
                            output_type, max_context_frames) -> None:
        """Raise with what to pass instead, before anything runs."""
        t = self.transformer
        if t is None:
            raise ValueError("WanStreamingPipeline needs a `transformer` (a block-causal text-to-video Wan DiT)")
        if self.transformer_2 is not None or self.config.boundary_ratio is not None or self.config.expand_timesteps:
            raise ValueError(
                "streaming runs one text-to-video transformer: load it without transformer_2 / boundary_ratio / "
                "expand_timesteps (Wan2.2 A14B and TI2V-5B are not block-causal models)"
            )
        if t.config.in_channels != self.vae.config.z_dim or getattr(t.config, "image_dim", None) is not None:
            raise ValueError(
                f"streaming needs a text-to-video transformer (in_channels == VAE z_dim {self.vae.config.z_dim}, no "
                f"CLIP branch); this one has in_channels={t.config.in_channels}, "
                f"image_dim={getattr(t.config, 'image_dim', None)}"
            )
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("pass exactly one of `prompt` (a string or a list of strings) and `prompt_embeds`")
        if prompt is not None and not isinstance(prompt, (str, list)):
            raise ValueError(f"`prompt` must be a string or a list of strings, got {type(prompt).__name__}")
        if num_blocks is not None and (not isinstance(num_blocks, int) or num_blocks < 1):
            raise ValueError(f"num_blocks must be a positive integer (or None for an endless stream), got {num_blocks!r}")
        if not isinstance(num_frames_per_block, int) or num_frames_per_block < 1:
            raise ValueError(f"num_frames_per_block must be a positive integer (krea: 3), got {num_frames_per_block!r}")
        validate_video_size(height, width, 1, spatial_factor=self.vae_scale_factor_spatial,
                            temporal_factor=self.vae_scale_factor_temporal, patch=t.config.patch_size[1])
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if max_context_frames is not None and (not isinstance(max_context_frames, int) or max_context_frames < 1):
            raise ValueError(f"max_context_frames must be a positive integer or None (all frames), got "
                             f"{max_context_frames!r}")

    # ------------------------------------------------------------------------------------------ generation
    @torch.no_grad()
    def stream(
        self,
        prompt: str | list[str] | None = None,
        num_blocks: int | None = 7,
        num_frames_per_block: int = 3,
        height: int = 480,
        width: int = 832,
        num_inference_steps: int = 4,
        shift: float = 5.0,
        sigmas: list[float] | None = None,
        context_timestep: float = 0.0,
        max_context_frames: int | None = None,
        num_videos_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        output_type: str = "np",
        max_sequence_length: int = 512,
        attention_kwargs: dict[str, Any] | None = None,
    ) -> Iterator[WanStreamChunk]:
        r"""
        Generate a video block by block; yields each block's frames as soon as they are decoded.

        Args:
            prompt (`str` or `list[str]`): the prompt(s); or pass ``prompt_embeds``.
            num_blocks (`int` or `None`, defaults to 7): blocks to generate (``None``: until the caller stops
                iterating or the RoPE table ends).  ``n`` blocks of 3 latent frames give ``12 n - 3`` frames.
            num_frames_per_block (`int`, defaults to 3): latent frames per block (krea's training block size).
            height (`int`, defaults to 480), width (`int`, defaults to 832): multiples of 16.
            num_inference_steps (`int`, defaults to 4), shift (`float`, defaults to 5.0): the distilled schedule
                (:func:`self_forcing_schedule`).
            sigmas (`list[float]`, *optional*): explicit decreasing noise levels in (0, 1] instead (timesteps
                ``1000 * sigma``).
            context_timestep (`float`, defaults to 0): timestep of the pass that writes a finished block into the
                KV cache (the reference's ``context_noise``).
            max_context_frames (`int`, *optional*): attend to at most this many earlier latent frames (sliding
                window); ``None``: all earlier frames.
            num_videos_per_prompt (`int`, defaults to 1): videos per prompt (all streamed together).
            generator (`torch.Generator` or list, *optional*): for the noise of every block and step.
            prompt_embeds (`torch.Tensor`, *optional*): precomputed umT5 context ``[B, L, 4096]``.
            output_type (`str`, defaults to `"np"`): ``"np"``, ``"pt"``, ``"pil"`` or ``"latent"`` (no decoding).
            max_sequence_length (`int`, defaults to 512): umT5 context length.
            attention_kwargs (`dict`, *optional*): passed to the transformer (e.g. LoRA ``scale``).

        Yields:
            :class:`WanStreamChunk` per block (frames, latents, indices, seconds since the start).
        """
        self.check_stream_inputs(prompt, prompt_embeds, num_blocks, num_frames_per_block, height, width, output_type,
                                 max_context_frames)
        start = time.perf_counter()
        self._guidance_scale = 1.0  # no classifier-free guidance: one forward per step
        self._attention_kwargs = attention_kwargs
        self._current_timestep = None
        self._interrupt = False
        device = self._execution_device
        transformer = self.transformer
        dtype = transformer.dtype

        if sigmas is None:
            timesteps, sigma = self_forcing_schedule(num_inference_steps, shift)
        else:
            sigma = torch.as_tensor(sigmas, dtype=torch.float32).flatten()
            if sigma.numel() < 1 or (sigma <= 0).any() or (sigma > 1).any() or (sigma[1:] > sigma[:-1]).any():
                raise ValueError(f"sigmas must be a non-empty, non-increasing list in (0, 1], got {list(sigmas)}")
            timesteps = sigma * self.scheduler.config.get("num_train_timesteps", 1000)
        prompt_embeds, _ = self.encode_prompt(
            prompt=prompt, do_classifier_free_guidance=False, num_videos_per_prompt=num_videos_per_prompt,
            prompt_embeds=prompt_embeds, max_sequence_length=max_sequence_length, device=device,
        )
        prompt_embeds = prompt_embeds.to(dtype)
        batch = prompt_embeds.shape[0]
        if isinstance(generator, list) and len(generator) != batch:
            raise ValueError(f"got {len(generator)} generators for a batch of {batch}: pass one per video")
        shape = (batch, self.vae.config.z_dim, num_frames_per_block,
                 height // self.vae_scale_factor_spatial, width // self.vae_scale_factor_spatial)

        tokens_per_block = num_frames_per_block * (shape[3] // transformer.config.patch_size[1]) * (
            shape[4] // transformer.config.patch_size[2])
        cache = enable_block_causal_cache(transformer, max_context_frames=max_context_frames,
                                          reserve_tokens=tokens_per_block * num_blocks if num_blocks else 0)
        decoder = WanStreamingVAEDecoder(self.vae) if output_type != "latent" else None
        context_t = torch.full((batch,), float(context_timestep), device=device)
        frame_index, block = 0, 0
        try:
            while num_blocks is None or block < num_blocks:
                latents = self._denoise_block(shape, timesteps, sigma, prompt_embeds, generator, device, dtype,
                                              attention_kwargs)
                frames = None
                if decoder is not None:
                    video = decoder.decode(latents.to(get_module_execution_device(self.vae)))
                    frames = self.video_processor.postprocess_video(video, output_type=output_type)
                n = 1 + (shape[2] - 1) * self.vae_scale_factor_temporal if block == 0 else \
                    shape[2] * self.vae_scale_factor_temporal
                yield WanStreamChunk(frames=frames, latents=latents, block_index=block, frame_index=frame_index,
                                     elapsed=time.perf_counter() - start)
                frame_index += n
                block += 1
                if num_blocks is None or block < num_blocks:  # the last block's keys / values are never needed
                    with cache.committing():
                        transformer(hidden_states=latents.to(dtype), timestep=context_t,
                                    encoder_hidden_states=prompt_embeds, attention_kwargs=attention_kwargs,
                                    return_dict=False)
        finally:
            disable_block_causal_cache(transformer)

    def _denoise_block(self, shape, timesteps, sigmas, prompt_embeds, generator, device, dtype, attention_kwargs):
        """One block through the shared loop (:meth:`denoise`, one forward per step): the Self-Forcing sampler's x0
        prediction, re-noised to the next step's sigma between steps."""

        def self_forcing_step(velocity: torch.Tensor, t: torch.Tensor, x: torch.Tensor, i: int) -> torch.Tensor:
            x0 = x - float(sigmas[i]) * velocity.float()
            if i + 1 == len(timesteps):
                return x0
            nxt = float(sigmas[i + 1])
            return (1 - nxt) * x0 + nxt * randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)

        return self.denoise(
            randn_tensor(shape, generator=generator, device=device, dtype=torch.float32),
            timesteps,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=None,
            guidance_scale=1.0,
            num_inference_steps=len(timesteps),
            transformer_dtype=dtype,
            attention_kwargs=attention_kwargs,
            timestep_of=lambda t, x: torch.full((shape[0],), float(t), device=device),
            step=self_forcing_step,
            transformer=self.transformer,
            progress=False,
        )

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        num_blocks: int = 7,
        num_frames_per_block: int = 3,
        height: int = 480,
        width: int = 832,
        num_inference_steps: int = 4,
        shift: float = 5.0,
        sigmas: list[float] | None = None,
        context_timestep: float = 0.0,
        max_context_frames: int | None = None,
        num_videos_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        max_sequence_length: int = 512,
        attention_kwargs: dict[str, Any] | None = None,
        sliding_window_size: int | None = None,
        sliding_window_stride: int | None = None,
    ) -> WanPipelineOutput | tuple:
        r"""
        Generate the whole video (all ``num_blocks`` blocks of :meth:`stream`) and return it at once.

        Arguments are those of :meth:`stream` (``num_blocks`` must be a number here) plus ``return_dict``, and
        ``sliding_window_size`` / ``sliding_window_stride``, which this pipeline refuses (a ``ValueError`` says why:
        it already generates block by block).

        Returns:
            [`WanPipelineOutput`] with ``frames`` (``[B, F, H, W, 3]`` for ``"np"``; latents ``[B, 16, T, h, w]`` for
            ``"latent"``), or a tuple ``(frames,)``.
        """
        self.check_sliding_window_options(sliding_window_size, sliding_window_stride)
        if num_blocks is None:
            raise ValueError("__call__ needs a finite num_blocks; iterate pipe.stream(..., num_blocks=None) instead")
        chunks = list(self.stream(**forwarded(locals(), self.stream)))  # all but return_dict and the window pair
        if output_type == "latent":
            video = torch.cat([c.latents for c in chunks], dim=2)
        elif output_type == "np":
            video = np.concatenate([c.frames for c in chunks], axis=1)
        elif output_type == "pt":
            video = torch.cat([c.frames for c in chunks], dim=1)
        else:
            video = [sum((c.frames[b] for c in chunks), []) for b in range(len(chunks[0].frames))]
        self.maybe_free_model_hooks()
        if not return_dict:
            return (video,)
        return WanPipelineOutput(frames=video)
