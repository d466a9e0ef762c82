"""The causal decode state of one video over a stock Diffusers ``WanDecoder3d``: the engine of the fast decode.

:class:`WanDecodeSession` decodes one latent frame per :meth:`~WanDecodeSession.step`, exactly as the stock decoder
does with a feature cache carried from frame to frame, but with one input buffer per causal conv (``[2 cached
frames | new frames]``, the fused norm kernel of :mod:`.norm_kernel` writing the new frames straight into it),
in-place residual adds, a broadcast ``DupUp3D`` shortcut and one-copy upsampling. :mod:`.fast_decode` installs it
behind ``vae.decode`` (:func:`~.fast_decode.optimize_vae`) and explains each change and its memory effect;
:class:`~.streaming.WanStreamingVAEDecoder` keeps one session across the blocks of a video.

Example:
    >>> session = WanDecodeSession(vae)  # doctest: +SKIP
    >>> x = pointwise_conv(vae.post_quant_conv, z)  # doctest: +SKIP
    >>> frames = [session.step(x[:, :, i:i + 1]) for i in range(x.shape[2])]  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.autoencoder_kl_wan import WanResidualUpBlock, WanUpBlock
from torch import nn

from .norm_kernel import rms_norm_act, wan_norm_weight

__all__ = ["CACHE_T", "WanDecodeSession", "pointwise_conv"]

CACHE_T = 2  # frames of causal context kept per conv (as in the stock VAE)


def pointwise_conv(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A ``WanCausalConv3d`` without temporal context (1x1x1 shortcut, post_quant_conv): no cache, no padding copy."""
    return F.conv3d(x, conv.weight, conv.bias, 1, (0, conv._padding[2], conv._padding[0]))


def _to_5d(frames: torch.Tensor, batch: int) -> torch.Tensor:
    """(B*T, C, H, W) per-frame tensor -> (B, C, T, H, W) view (channels-last 2D frames give channels-last 3D)."""
    return frames.unflatten(0, (batch, -1)).transpose(1, 2)


class WanDecodeSession:
    """Causal decode state of one video over a stock ``WanDecoder3d`` (the fast decode of :mod:`.fast_decode`).

    ``step(x)`` decodes the next latent frame (``x``: (B, z_dim, 1, h, w), after ``post_quant_conv``) and returns
    the decoder output for it (before un-patchify and clamp), exactly as stock ``vae.decoder(x, feat_cache,
    feat_idx, first_chunk)`` does with a cache carried from frame to frame. The session owns a persistent 2-frame
    cache per causal conv (made on first use, at the video's size) and reads the weights of the VAE's modules at
    each step. Use it under ``torch.no_grad()``.

    The decoder is run as a flat plan of ``(step, module)`` pairs over one activation slot (``self._x``): each step
    takes the activation out of the slot and puts its result back, so no caller keeps a block's input alive
    while the block runs (each full-resolution activation of Wan2.1 is 0.29 GiB at 480x832x4 in bf16).

    Args:
        vae: a stock ``AutoencoderKLWan``.
        channels_last: run activations channels-last (default: whatever :func:`~.fast_decode.optimize_vae` chose,
            else True).
    """

    def __init__(self, vae: nn.Module, channels_last: bool | None = None) -> None:
        if channels_last is None:
            channels_last = getattr(vae, "_wan_fast_decode", {}).get("channels_last", True)
        self.vae = vae
        self.decoder = vae.decoder
        self.fmt5 = torch.channels_last_3d if channels_last else torch.contiguous_format
        self.fmt4 = torch.channels_last if channels_last else torch.contiguous_format
        self.frames = 0  # latent frames decoded so far
        self._first = True
        self._x: torch.Tensor | None = None  # the activation between plan steps
        self._x_in: torch.Tensor | None = None  # a residual up block's input, for its DupUp3D shortcut
        self._cache: dict[nn.Module, torch.Tensor] = {}
        self._norm: dict[nn.Module, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._started: set[nn.Module] = set()  # upsample3d resamples past their first chunk
        self._plan = self._make_plan()

    def _make_plan(self) -> list[tuple[Callable[..., None], nn.Module]]:
        # plain functions, not bound methods: a plan of bound methods is a reference cycle (session -> plan ->
        # method -> session) that keeps every conv cache alive until the garbage collector runs
        cls = type(self)
        dec = self.decoder
        mid = dec.mid_block
        plan = [(cls._conv_in, dec.conv_in), (cls._resnet, mid.resnets[0])]
        for attn, resnet in zip(mid.attentions, mid.resnets[1:]):
            plan += [(cls._attention, attn)] if attn is not None else []
            plan.append((cls._resnet, resnet))
        # per up-block kind: (upsampler, DupUp3D shortcut or None)
        parts: dict[type, Callable[[nn.Module], tuple[nn.Module | None, nn.Module | None]]] = {
            WanUpBlock: lambda b: (b.upsamplers[0] if b.upsamplers is not None else None, None),
            WanResidualUpBlock: lambda b: (b.upsampler, b.avg_shortcut),
        }
        for block in dec.up_blocks:
            upsampler, dup = parts[type(block)](block)
            plan += [(cls._keep_input, block)] if dup is not None else []
            plan += [(cls._resnet, resnet) for resnet in block.resnets]
            plan += [(cls._resample, upsampler)] if upsampler is not None else []
            plan += [(cls._dup_up_add, dup)] if dup is not None else []
        plan.append((cls._head, dec))
        return plan

    def _take(self) -> torch.Tensor:
        x, self._x = self._x, None
        return x

    # -- building blocks -----------------------------------------------------------------------------------------

    def _norm_params(self, norm: nn.Module, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        if norm not in self._norm:
            weight, bias = wan_norm_weight(norm)
            self._norm[norm] = (weight.to(device), None if bias is None else bias.to(device))
        return self._norm[norm]

    def _norm_into(self, norm: nn.Module | None, x: torch.Tensor, out: torch.Tensor, silu: bool = True) -> None:
        if norm is None:
            out.copy_(x)
        else:
            weight, bias = self._norm_params(norm, x.device)
            rms_norm_act(x, weight, bias, silu=silu, out=out)

    def _conv_input(self, conv: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(buf, new)``: the conv's input buffer with its history in front, and the view where the new frames go."""
        b, c, t, h, w = x.shape
        buf = torch.empty((b, c, t + CACHE_T, h, w), dtype=x.dtype, device=x.device, memory_format=self.fmt5)
        cache = self._cache.get(conv)
        if cache is None:  # first chunk: stock pads with zero frames
            buf[:, :, :CACHE_T].zero_()
        elif cache.shape != (b, c, CACHE_T, h, w):
            raise ValueError(f"latent size changed within one decode: cache {tuple(cache.shape)}, input "
                             f"{tuple(x.shape)} (start a new session / video)")
        else:
            buf[:, :, :CACHE_T].copy_(cache)
        return buf, buf[:, :, CACHE_T:]

    def _conv_run(self, conv: nn.Module, buf: torch.Tensor) -> torch.Tensor:
        """The causal conv on its filled buffer; keeps the buffer's last two frames as the conv's history."""
        pad = (0, conv._padding[2], conv._padding[0])
        out = F.conv3d(buf, conv.weight, conv.bias, 1, pad)
        cache = self._cache.get(conv)
        if cache is None:
            cache = self._cache[conv] = torch.empty_like(buf[:, :, :CACHE_T], memory_format=self.fmt5)
        cache.copy_(buf[:, :, -CACHE_T:])
        return out

    # -- plan steps (each takes self._x and puts its result back) -----------------------------------------------

    def _conv_in(self, conv: nn.Module) -> None:
        x = self._take()
        buf, new = self._conv_input(conv, x)
        new.copy_(x)
        del x, new
        self._x = self._conv_run(conv, buf)

    def _resnet(self, block: nn.Module) -> None:
        x = self._take()
        shortcut = block.conv_shortcut
        h = x if isinstance(shortcut, nn.Identity) else pointwise_conv(shortcut, x)
        buf, new = self._conv_input(block.conv1, x)
        self._norm_into(block.norm1, x, new)
        del x, new  # an identity shortcut keeps it as h
        y = self._conv_run(block.conv1, buf)
        del buf  # the next conv's buffer takes its place
        buf, new = self._conv_input(block.conv2, y)
        self._norm_into(block.norm2, y, new)
        del y, new  # conv1's output is dead before conv2 allocates its own
        self._x = self._conv_run(block.conv2, buf).add_(h)

    def _attention(self, attn: nn.Module) -> None:
        x = self._take()
        b, c, t, h, w = x.shape
        xn = torch.empty_like(x, memory_format=self.fmt5)
        self._norm_into(attn.norm, x, xn, silu=False)
        frames = xn.transpose(1, 2).reshape(b * t, c, h, w)
        del xn
        qkv = F.conv2d(frames, attn.to_qkv.weight, attn.to_qkv.bias)
        del frames
        q, k, v = qkv.flatten(2).transpose(1, 2).unsqueeze(1).chunk(3, dim=-1)  # (B*T, 1, H*W, C) each
        o = F.scaled_dot_product_attention(q, k, v)
        del q, k, v, qkv
        o = o.squeeze(1).transpose(1, 2).unflatten(2, (h, w))
        self._x = _to_5d(F.conv2d(o, attn.proj.weight, attn.proj.bias), b).add_(x)

    def _resample(self, m: nn.Module) -> None:
        x = self._take()
        b, c, t, h, w = x.shape
        if m.mode == "upsample3d" and m in self._started:
            buf, new = self._conv_input(m.time_conv, x)
            new.copy_(x)
            del x, new
            y = self._conv_run(m.time_conv, buf)  # (B, 2C, T, H, W); channel block j is output frame 2t + j
            del buf
            src = y.unflatten(1, (2, c)).permute(0, 3, 1, 2, 4, 5)
        else:  # upsample2d, or the first chunk of upsample3d (stock "Rep": no time conv)
            if m.mode == "upsample3d":
                self._started.add(m)
            src = x.transpose(1, 2).unsqueeze(2)
            del x
        t_out = src.shape[1] * src.shape[2]
        # time interleave + nearest 2x upsample, one copy into the conv2d's channels-last input
        up = torch.empty((b * t_out, c, 2 * h, 2 * w), dtype=src.dtype, device=src.device, memory_format=self.fmt4)
        dst = up.unflatten(0, src.shape[:3]).unflatten(4, (h, 2)).unflatten(6, (w, 2))  # (B, T, J, C, H, 2, W, 2)
        dst.copy_(src[:, :, :, :, :, None, :, None])
        del dst
        del src
        conv = m.resample[1]
        out = F.conv2d(up, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
        self._x = _to_5d(out, b)

    def _keep_input(self, block: nn.Module) -> None:
        self._x_in = self._x

    def _dup_up_add(self, dup: nn.Module) -> None:
        """``x += DupUp3D(x_in)`` with the repeated channels as a broadcast view where the layout allows."""
        x, x_in, self._x_in = self._take(), self._x_in, None
        b, c_in, t, h, w = x_in.shape
        ft, fs, reps, c_out = dup.factor_t, dup.factor_s, dup.repeats, dup.out_channels
        if dup.factor % reps == 0:  # channel k = c * reps + r of the repeat is (o, dt, a, b) of the view
            per = dup.factor // reps
            src = x_in.unflatten(1, (c_out, per)).unsqueeze(3).expand(b, c_out, per, reps, t, h, w)
        else:
            src = x_in.repeat_interleave(reps, dim=1)
        del x_in
        src = src.reshape(b, c_out, ft, fs, fs, t, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)  # (B, O, T, ft, H, fs, W, fs)
        if self._first and ft > 1:  # stock drops the first ft - 1 frames of the first chunk
            src = src.flatten(2, 3)[:, :, ft - 1:].unsqueeze(3)
        target = x.unflatten(2, (src.shape[2], src.shape[3])).unflatten(4, (h, fs)).unflatten(6, (w, fs))
        target.add_(src)
        del target, src
        self._x = x

    def _head(self, dec: nn.Module) -> None:
        x = self._take()
        buf, new = self._conv_input(dec.conv_out, x)
        self._norm_into(dec.norm_out, x, new)
        del x, new
        self._x = self._conv_run(dec.conv_out, buf)

    # -- one latent frame -----------------------------------------------------------------------------------------

    def step(self, x: torch.Tensor) -> torch.Tensor:
        """Decoder output of the next latent frame ``x`` (B, z_dim, 1, h, w) (already through ``post_quant_conv``)."""
        if x.ndim != 5 or x.shape[2] != 1:
            raise ValueError(f"step takes one latent frame (B, C, 1, h, w), got {tuple(x.shape)}")
        self._first = self.frames == 0
        self._x = x
        del x
        try:
            for run, module in self._plan:
                run(self, module)
            return self._take()
        finally:
            self._x = self._x_in = None
            self.frames += 1

    def release(self) -> None:
        """Free the causal caches and buffers now (the session cannot continue afterwards)."""
        self._cache.clear()
        self._norm.clear()
        self._x = self._x_in = None
