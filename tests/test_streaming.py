"""Streaming (block-causal, KV-cached) generation for Self-Forcing-distilled Wan models (krea realtime), on CPU.

* the KV-cached block-by-block transformer equals one forward over all frames with the explicit block-causal mask
  (stock attention processor + mask), globally and with a sliding window;
* the streaming VAE decode of latent blocks equals one stock ``vae.decode`` of the whole latent;
* the pipeline yields a block's frames before the next block is denoised, its chunks add up to ``__call__``'s video,
  a one-block stream equals a plain (cache-free) few-step loop written here, text keys / values are projected once,
  and the transformer is restored afterwards;
* errors for what streaming cannot do.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
from diffusers.models.transformers.transformer_wan import WanAttnProcessor

from diffusers_wan_ext import WanStreamingPipeline
from diffusers_wan_ext.hooks.block_causal import (
    block_causal_mask,
    disable_block_causal_cache,
    enable_block_causal_cache,
)
from diffusers_wan_ext.vae import WanStreamingVAEDecoder, denormalize_latents
from diffusers_wan_ext.pipelines.pipeline_wan_streaming import self_forcing_schedule
from test_fun_pipelines import Spy, make_text_parts, make_vae

H = W = 16  # pixels -> 2x2 latents -> 1 token per frame (the cache tests below use 4x4 latents)


def tiny_transformer(seed=0, rope_max_seq_len=1024):
    torch.manual_seed(seed)
    model = WanTransformer3DModel(num_attention_heads=2, attention_head_dim=24, in_channels=16, out_channels=16,
                                  text_dim=32, freq_dim=32, ffn_dim=96, num_layers=2,
                                  rope_max_seq_len=rope_max_seq_len).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


class MaskedSelfAttention(WanAttnProcessor):
    """Stock processor with an explicit attention mask (the reference's block mask for one full forward)."""

    def __init__(self, mask):
        super().__init__()
        self.mask = mask

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        return super().__call__(attn, hidden_states, None, self.mask, rotary_emb)


@pytest.mark.parametrize("window", [None, 2])
def test_kv_cache_equals_full_forward_with_block_causal_mask(window):
    model = tiny_transformer()
    g = torch.Generator().manual_seed(0)
    blocks, per_block = 4, 2  # with a window, the key / value buffer is compacted twice on the way
    x = torch.randn(1, 16, blocks * per_block, 4, 4, generator=g)
    ctx = torch.randn(1, 12, 32, generator=g)
    t_blocks = [0.0, 250.0, 0.0, 100.0]  # the commit pass of each block (any timestep works)

    # one forward over all frames: stock processors + explicit block-causal mask, per-token timesteps
    mask = block_causal_mask(blocks * per_block, 4, per_block, max_context_frames=window)
    originals = {i: b.attn1.processor for i, b in enumerate(model.blocks)}
    for b in model.blocks:
        b.attn1.set_processor(MaskedSelfAttention(mask))
    per_token = torch.tensor(t_blocks).repeat_interleave(per_block * 4)[None]
    with torch.no_grad():
        full = model(x, per_token, ctx, return_dict=False)[0]
    for i, b in enumerate(model.blocks):
        b.attn1.set_processor(originals[i])

    # block by block through the cache
    cache = enable_block_causal_cache(model, max_context_frames=window)
    outs = []
    with torch.no_grad():
        for b, t in enumerate(t_blocks):
            xb = x[:, :, b * per_block:(b + 1) * per_block]
            noisy = model(xb, torch.tensor([900.0]), ctx, return_dict=False)[0]  # does not touch the cache
            assert cache.num_frames == b * per_block
            with cache.committing():
                outs.append(model(xb, torch.tensor([t]), ctx, return_dict=False)[0])
            assert not torch.allclose(noisy, outs[-1])
    assert cache.num_frames == blocks * per_block
    assert cache.cached_frames == (blocks * per_block if window is None else window)
    disable_block_causal_cache(model)
    torch.testing.assert_close(torch.cat(outs, dim=2), full, rtol=1e-5, atol=1e-5)
    if window is not None:  # the window matters: global attention gives another last block
        global_mask = block_causal_mask(blocks * per_block, 4, per_block)
        assert not torch.equal(global_mask, mask)


def test_block_causal_mask_layout():
    m = block_causal_mask(6, 1, 2, max_context_frames=1)
    assert m.int().tolist() == [
        [1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0],
        [0, 1, 1, 1, 0, 0], [0, 1, 1, 1, 0, 0],
        [0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 1],
    ]


def test_streaming_vae_decode_equals_one_shot_decode():
    vae = make_vae()
    g = torch.Generator().manual_seed(1)
    z = torch.randn(1, 16, 7, 2, 2, generator=g)
    with torch.no_grad():
        whole = vae.decode(z).sample
    decoder = WanStreamingVAEDecoder(vae)
    parts = [decoder.decode(z[:, :, a:b], normalized=False) for a, b in ((0, 3), (3, 5), (5, 7))]
    assert [p.shape[2] for p in parts] == [9, 8, 8]
    torch.testing.assert_close(torch.cat(parts, dim=2), whole, rtol=0, atol=1e-6)
    decoder.reset()  # a new video starts from frame 0 again
    torch.testing.assert_close(decoder.decode(z[:, :, :3], normalized=False), whole[:, :, :9], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="z_dim"):
        decoder.decode(torch.zeros(1, 4, 1, 4, 4))


# ------------------------------------------------------------------------------------------------ pipeline
@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    tokenizer, text_encoder = make_text_parts(tmp_path_factory.mktemp("tok") / "umt5")
    return WanStreamingPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=make_vae(),
                                scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0), transformer=tiny_transformer())


def stream_kwargs(**kw):
    return {**dict(prompt="a cat surfing", num_blocks=3, num_frames_per_block=2, height=H, width=W,
                   num_inference_steps=3), **kw}


def test_stream_yields_each_block_before_the_next_is_denoised(pipe):
    spy = Spy(pipe.transformer)
    stream = pipe.stream(**stream_kwargs(), generator=torch.Generator().manual_seed(0))
    first = next(stream)
    assert len(spy.calls) == 3  # only block 0's three denoising steps so far
    assert first.block_index == 0 and first.frame_index == 0 and first.frames.shape == (1, 5, H, W, 3)
    rest = list(stream)
    spy.remove()
    # 3 blocks x 3 steps + 2 commit passes (the last block is never needed as context)
    assert len(spy.calls) == 3 * 3 + 2
    assert [c.frames.shape[1] for c in rest] == [8, 8] and [c.frame_index for c in rest] == [5, 13]
    commits = [c for c in spy.calls if float(c["timestep"][0]) == 0.0 and c["hidden_states"].shape[2] == 2]
    assert len(commits) >= 2
    assert all(0.0 <= c.elapsed for c in [first, *rest])


def test_stream_matches_call_and_one_shot_decode(pipe, tmp_path):
    from diffusers.utils import export_to_video, load_video

    chunks = list(pipe.stream(**stream_kwargs(), output_type="pt", generator=torch.Generator().manual_seed(3)))
    video = pipe(**stream_kwargs(), generator=torch.Generator().manual_seed(3)).frames
    streamed = torch.cat([c.frames for c in chunks], dim=1)
    assert video.shape == (1, 21, H, W, 3)
    np.testing.assert_allclose(video, streamed.permute(0, 1, 3, 4, 2).numpy(), atol=1e-6)
    latents = torch.cat([c.latents for c in chunks], dim=2)
    with torch.no_grad():
        whole = pipe.vae.decode(denormalize_latents(pipe.vae, latents)).sample
    whole = pipe.video_processor.postprocess_video(whole, output_type="pt")
    torch.testing.assert_close(streamed, whole, rtol=0, atol=1e-5)
    path = export_to_video(list(video[0]), str(tmp_path / "stream.mp4"), fps=8)
    assert len(load_video(path)) == 21


def test_one_block_stream_is_the_plain_few_step_sampler(pipe):
    """Without earlier blocks the cache changes nothing: a stock forward loop gives the same block."""
    g = torch.Generator().manual_seed(5)
    chunk = next(pipe.stream(**stream_kwargs(num_blocks=1), output_type="latent", generator=g))
    timesteps, sigmas = self_forcing_schedule(3, 5.0)
    g = torch.Generator().manual_seed(5)
    shape = (1, 16, 2, H // 8, W // 8)
    with torch.no_grad():
        ctx = pipe.encode_prompt("a cat surfing", do_classifier_free_guidance=False, max_sequence_length=512)[0]
        x = torch.randn(shape, generator=g)
        for i in range(3):
            v = pipe.transformer(x, timesteps[i:i + 1], ctx, return_dict=False)[0]
            x0 = x - sigmas[i] * v
            if i < 2:
                x = (1 - sigmas[i + 1]) * x0 + sigmas[i + 1] * torch.randn(shape, generator=g)
    torch.testing.assert_close(chunk.latents, x0, rtol=1e-5, atol=1e-5)
    assert chunk.frames is None


def test_text_keys_values_once_and_transformer_restored(pipe):
    calls = []
    handle = pipe.transformer.blocks[0].attn2.to_k.register_forward_hook(lambda *a: calls.append(1))
    x = torch.randn(1, 16, 2, 4, 4)
    ctx = torch.randn(1, 512, 32)
    with torch.no_grad():
        before = pipe.transformer(x, torch.tensor([500.0]), ctx, return_dict=False)[0]
        calls.clear()
        stream = pipe.stream(**stream_kwargs(num_blocks=None), output_type="latent")
        got = [next(stream) for _ in range(2)]
        assert len(calls) == 1  # 2 blocks x 3 steps + 1 commit pass, one projection of the text
        stream.close()  # an endless stream stopped by the caller
        after = pipe.transformer(x, torch.tensor([500.0]), ctx, return_dict=False)[0]
    handle.remove()
    assert len(got) == 2 and got[1].block_index == 1
    assert all(type(b.attn1.processor) is WanAttnProcessor for b in pipe.transformer.blocks)
    torch.testing.assert_close(after, before)


def test_sliding_window_changes_later_blocks_only(pipe):
    kw = dict(**stream_kwargs(), output_type="latent")
    full = list(pipe.stream(**kw, generator=torch.Generator().manual_seed(2)))
    window = list(pipe.stream(**kw, max_context_frames=2, generator=torch.Generator().manual_seed(2)))
    torch.testing.assert_close(window[0].latents, full[0].latents)
    torch.testing.assert_close(window[1].latents, full[1].latents)  # 2 earlier frames either way
    assert not torch.allclose(window[2].latents, full[2].latents)  # 4 earlier frames vs the last 2


def test_stream_input_errors(pipe):
    def first(**kw):
        return next(pipe.stream(**{**stream_kwargs(), **kw}))

    with pytest.raises(ValueError, match="num_blocks must be a positive integer"):
        first(num_blocks=0)
    with pytest.raises(ValueError, match="num_frames_per_block"):
        first(num_frames_per_block=0)
    with pytest.raises(ValueError, match="multiple of 16"):
        first(height=40)
    with pytest.raises(ValueError, match="exactly one of `prompt`"):
        first(prompt_embeds=torch.zeros(1, 512, 32))
    with pytest.raises(ValueError, match="output_type"):
        first(output_type="mp4")
    with pytest.raises(ValueError, match="sigmas"):
        first(sigmas=[0.5, 0.9])
    with pytest.raises(ValueError, match="max_context_frames"):
        first(max_context_frames=0)
    with pytest.raises(ValueError, match="finite num_blocks"):
        pipe(prompt="a", num_blocks=None)
    i2v = WanTransformer3DModel(num_attention_heads=2, attention_head_dim=24, in_channels=36, text_dim=32,
                                freq_dim=32, ffn_dim=96, num_layers=1, image_dim=32, added_kv_proj_dim=48)
    other = WanStreamingPipeline(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=pipe.vae,
                                 scheduler=pipe.scheduler, transformer=i2v)
    with pytest.raises(ValueError, match="text-to-video transformer"):
        next(other.stream(**stream_kwargs()))
    with pytest.raises(ValueError, match="image cross-attention"):
        enable_block_causal_cache(i2v)
    short = WanStreamingPipeline(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=pipe.vae,
                                 scheduler=pipe.scheduler, transformer=tiny_transformer(rope_max_seq_len=4))
    with pytest.raises(ValueError, match="RoPE table of 4 frames"):
        list(short.stream(**stream_kwargs(), output_type="latent"))
    assert all(type(b.attn1.processor) is WanAttnProcessor for b in short.transformer.blocks)
    cache = enable_block_causal_cache(pipe.transformer)
    with pytest.raises(ValueError, match="already enabled"):
        first()
    disable_block_causal_cache(pipe.transformer)
    assert cache.num_frames == 0


def test_save_and_load_round_trip(pipe, tmp_path):
    from diffusers import DiffusionPipeline

    pipe.save_pretrained(tmp_path / "streaming")
    loaded = DiffusionPipeline.from_pretrained(tmp_path / "streaming")
    assert isinstance(loaded, WanStreamingPipeline)
    a = next(pipe.stream(**stream_kwargs(), output_type="latent", generator=torch.Generator().manual_seed(0)))
    b = next(loaded.stream(**stream_kwargs(), output_type="latent", generator=torch.Generator().manual_seed(0)))
    torch.testing.assert_close(a.latents, b.latents)
