"""``teacache``: stock ``WanPipeline`` + ``WanFlowMatchScheduler`` with our TeaCache hooks (``diffusers_wan_ext.hooks``)
on the converted DiT; decisions, distances and per-step tensors read off the running pipeline."""

from __future__ import annotations

import torch
from diffusers import WanPipeline

from diffusers_wan_ext.hooks import TeaCacheConfig, apply_teacache, remove_teacache, teacache_log
from diffusers_wan_ext.schedulers import WanFlowMatchScheduler

from .core import GoldenCase, runner
from .loops import LoopRecorder, _call_kwargs, _no_progress, _select, _single_dit


@runner("teacache")
def run_teacache(case: GoldenCase, tmp_path) -> dict:
    x = case.inputs
    dit = _single_dit(case)
    tc = case.manifest.get("teacache", {})
    config = TeaCacheConfig(
        threshold=float(case.value("tea_cache_l1_thresh")),
        model_id=case.value("tea_cache_model_id"),
        coefficients=tuple(tc["coefficients"]) if "coefficients" in tc else None,
        record=True,
    )

    def run(with_cache: bool):
        scheduler = WanFlowMatchScheduler(shift=float(case.value("sigma_shift")))
        pipe = _no_progress(WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=scheduler, transformer=dit))
        if with_cache:
            apply_teacache(dit, config)
        try:
            with LoopRecorder(pipe, {"dit": dit}, x["context_posi"], x["context_nega"]) as rec:
                final = pipe(latents=x["noise"].clone(), num_frames=int(case.value("pipeline_call")["num_frames"]),
                             callback_on_step_end=rec.callback, **_call_kwargs(case))[0]
            logs = {ctx: teacache_log(dit, ctx) for ctx in ("cond", "uncond")}
        finally:
            remove_teacache(dit)
        return rec, pipe, final, logs

    rec, pipe, final, logs = run(True)
    _, _, final_plain, _ = run(False)
    cond, uncond = logs["cond"], logs["uncond"]
    decisions = [r["decision"] for r in cond]
    if decisions != [r["decision"] for r in uncond]:
        raise AssertionError(f"cond / uncond TeaCache decisions differ: {decisions} vs {[r['decision'] for r in uncond]}")
    thresh = config.threshold
    out = {
        **rec.schedule(pipe.scheduler),
        **rec.stacked(),
        "latents_final": final,
        "latents_final_no_teacache": final_plain,
        "t_mod_per_step": torch.stack([r["indicator"].reshape(r["indicator"].shape[0], 6, -1) for r in cond]),
        "decisions": decisions,
        "rel_l1_per_step": [r["rel_l1"] for r in cond],
        "rescaled_distance_per_step": [r["rescaled"] for r in cond],
        "accumulated_distance_after_check": [r["accumulated"] for r in cond],
    }
    # smallest distance of a non-forced accumulated value from the threshold (before a compute resets it)
    acc, unforced = 0.0, []
    for r in cond:
        if r["rescaled"] is None or r["step"] in (0, len(cond) - 1):
            acc = 0.0
            continue
        acc += r["rescaled"]
        unforced.append(abs(acc - thresh))
        if acc >= thresh:
            acc = 0.0
    out["min_margin_to_threshold"] = min(unforced) if unforced else None
    return _select(case, out)
