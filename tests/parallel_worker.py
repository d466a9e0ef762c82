"""Worker of tests/test_parallel.py, launched with ``torchrun --nproc_per_node=N tests/parallel_worker.py CASE OUT``.

Every rank builds the same tiny fp32 models (same seeds), computes the single-process result first, then enables
parallelism (gloo on CPU; NCCL on GPUs) and runs again; it writes ``OUT/rank<r>.json`` with the max abs difference
per check (and what its pipeline returned), which the test compares.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "src")]

import torch  # noqa: E402
from diffusers import WanTransformer3DModel, WanVACETransformer3DModel  # noqa: E402

from diffusers_wan_ext.parallel import enable_parallelism, init_distributed  # noqa: E402

CASE, OUT = sys.argv[1], Path(sys.argv[2])
rank, world, device = init_distributed()
results: dict[str, object] = {}


def diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def check_model(name, model, inputs, compile_backend=None, **parallel):
    with torch.no_grad():
        ref = model(**inputs, return_dict=False)[0]
    enable_parallelism(model, cfg_parallel=False, **parallel)
    if compile_backend:
        model.compile_repeated_blocks(fullgraph=True, backend=compile_backend)
    with torch.no_grad():
        out = model(**inputs, return_dict=False)[0]
        out_again = model(**{**inputs}, return_dict=False)[0]  # hooks keep working on a second call
    results[name] = max(diff(ref, out), diff(ref, out_again))


def tiny(cls=WanTransformer3DModel, seed=0, **kwargs):
    torch.manual_seed(seed)
    args = dict(num_attention_heads=4, attention_head_dim=16, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2)
    return cls(**args, **kwargs).to(device).eval()


def randn(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape))).to(device)


text = randn(1, 12, 32)
t = torch.tensor([700.0], device=device)

if CASE == "models":
    # stock T2V: 3x4x4 = 48 tokens (divides), 3x3x3 = 27 tokens (padded to 28 for 2 ranks)
    for label, size in (("t2v_even", 8), ("t2v_padded", 6)):
        check_model(label, tiny(), dict(hidden_states=randn(1, 16, 3, size, size), timestep=t,
                                        encoder_hidden_states=text))
    # regional torch.compile (fullgraph) through the context-parallel and padding hooks (Dynamo tracing only here:
    # Inductor's CPU codegen is slow on 2 cores; the GPU benchmark compiles with Inductor)
    model = tiny()
    check_model("t2v_padded_compiled", model, dict(hidden_states=randn(1, 16, 3, 6, 6), timestep=t,
                                                   encoder_hidden_states=text), compile_backend="eager")
    # Wan2.2 TI2V: per-token timesteps, padded
    x = randn(1, 16, 3, 6, 6)
    per_token = torch.linspace(0, 900, 27, device=device).view(1, 27)
    check_model("ti2v_per_token_padded", tiny(seed=1), dict(hidden_states=x, timestep=per_token,
                                                              encoder_hidden_states=text))
    # Wan-Fun: reference-image tokens (prepended, RoPE frame 0) + camera adapter + CLIP branch
    from diffusers_wan_ext import WanFunTransformer3DModel

    fun = tiny(WanFunTransformer3DModel, seed=2, in_channels=48, text_len=12, image_dim=24, added_kv_proj_dim=64,
               ref_conv_in_channels=16, control_adapter_in_channels=24)
    check_model("fun_reference_camera", fun, dict(
        hidden_states=randn(1, 48, 3, 6, 6), timestep=t, encoder_hidden_states=text,
        encoder_hidden_states_image=randn(1, 257, 24), reference_latents=randn(1, 16, 1, 6, 6),
        control_camera_latents=randn(1, 24, 3, 48, 48)))
    # VACE: control tokens at vace_blocks.0, hints added back to local video tokens; padded
    vace = tiny(WanVACETransformer3DModel, seed=3, vace_layers=[0, 1], vace_in_channels=8)
    check_model("vace_padded", vace, dict(hidden_states=randn(1, 16, 3, 6, 6), timestep=t,
                                          encoder_hidden_states=text, control_hidden_states=randn(1, 8, 3, 6, 6)))

elif CASE == "pipeline":
    from test_fun_pipelines import make_scheduler, make_text_parts, make_vae

    from diffusers_wan_ext import WanExtPipeline

    tokenizer, text_encoder = make_text_parts(OUT / f"umt5-{rank}")
    pipe = WanExtPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=make_vae(), scheduler=make_scheduler(),
        transformer=tiny(seed=1), transformer_2=tiny(seed=2), boundary_ratio=0.875,
    ).to(device)
    args = dict(prompt="a dog running", negative_prompt="blurry", height=32, width=48, num_frames=5,
                num_inference_steps=4, guidance_scale=4.0, guidance_scale_2=2.5)

    def call(**kwargs):
        return pipe(**{**args, **kwargs}, generator=torch.Generator().manual_seed(0)).frames

    ref_latents = call(output_type="latent")
    ref_video = call(output_type="pt")
    ref_no_cfg = call(output_type="latent", guidance_scale=1.0, guidance_scale_2=1.0)
    state = pipe.enable_parallelism()
    results["layout"] = [state.cfg_degree, state.ulysses_degree, state.ring_degree]
    results["latents"] = diff(ref_latents, call(output_type="latent"))
    video = call(output_type="pt")
    results["decoded"] = bool(video.ndim == 5 and video.shape[2] == 3)  # frames (B, F, C, H, W) vs latents
    results["video"] = diff(ref_video, video) if results["decoded"] else None
    results["no_cfg"] = diff(call(output_type="latent", guidance_scale=1.0, guidance_scale_2=1.0), ref_no_cfg)

elif CASE == "gpu_layouts":  # ring and hybrid need a kernel returning the log-sum-exp: cuDNN on CUDA, bf16
    for label, ulysses, ring in (("ring", 1, world), ("hybrid", 2, world // 2), ("ulysses_padded", world, 1)):
        if label == "hybrid" and world < 4:
            continue
        model = tiny(seed=4).to(torch.bfloat16)
        model.set_attention_backend("_native_cudnn")
        size = 6 if label == "ulysses_padded" else 8
        x = randn(1, 16, 4, size, size).to(torch.bfloat16)
        inputs = dict(hidden_states=x, timestep=t, encoder_hidden_states=text.to(torch.bfloat16))
        check_model(label, model, inputs, ulysses_degree=ulysses, ring_degree=ring)

elif CASE == "flash4_cp":
    # our flash_4_hub backend (the local flash-attn 4 package) under Ulysses and Ring: flash-attn 4 needs a Hopper
    # GPU, so a stand-in module with its interface (fp32 attention + log-sum-exp (B, H, S)) takes its place here
    from diffusers_wan_ext.runtime import flash4
    from diffusers_wan_ext.runtime.attention import _set_local_flash4
    from helpers import flash4_stand_in_modules

    def stand_in_fwd(q, k, v, softmax_scale=None, causal=False, return_lse=False, **knobs):
        scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * (softmax_scale or q.shape[-1] ** -0.5)
        out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v.float()).to(q.dtype)
        return out, (torch.logsumexp(scores, -1) if return_lse else None)

    sys.modules.update(flash4_stand_in_modules(stand_in_fwd))
    flash4._flash4_import.cache_clear()
    inputs = dict(hidden_states=randn(1, 16, 2, 8, 8), timestep=t, encoder_hidden_states=text)
    for label, ulysses, ring in (("flash4_ulysses", world, 1), ("flash4_ring", 1, world)):
        model = tiny(seed=5)
        _set_local_flash4(model)
        check_model(label, model, inputs, ulysses_degree=ulysses, ring_degree=ring)
        results[label + "_kept"] = all(
            str(getattr(m.processor, "_attention_backend", "flash_4_hub")) in ("flash_4_hub", "AttentionBackendName.FLASH_4_HUB")
            for m in model.modules() if hasattr(m, "processor"))

else:
    raise SystemExit(f"unknown case {CASE!r}")

OUT.mkdir(parents=True, exist_ok=True)
(OUT / f"rank{rank}.json").write_text(json.dumps(results))
torch.distributed.barrier()  # (destroy_process_group can hang on gloo subgroups at exit)
