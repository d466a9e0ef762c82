"""Denoising-loop cases: release-layout weights -> our converter -> a STOCK Diffusers Wan pipeline (or our subclass of
one) with our reference scheduler; the golden per-step tensors are read off the running pipeline.

* ``scheduler_t2v`` -- stock ``WanPipeline`` + ``WanFlowMatchScheduler``.
* ``scheduler_v2v`` -- ``WanVideoToVideoReferencePipeline`` (``denoising_strength``, ``video_latents``, ``noise``).
* ``moe_switch`` -- stock ``WanPipeline`` with ``transformer_2`` / ``boundary_ratio``: one guidance scale (DiffSynth)
  and ``guidance_scale`` = high / ``guidance_scale_2`` = low (original Wan2.2 dual guidance).
* ``ti2v_first_frame`` -- ``WanImageToVideoReferencePipeline(expand_timesteps=True)`` fed ``image_latents``.

What is captured, and how: every transformer forward through a forward hook (input latents, timestep, context,
output; cond / uncond told apart by the context), the guided velocity through a spy on ``scheduler.step`` (its
``model_output``), the latents after each step through ``callback_on_step_end``.  Nothing of the loop is
re-implemented here; shapes, seeds and step counts all come from the manifest and the tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import AutoencoderKLWan, WanPipeline

from diffusers_wan_ext.pipelines import WanImageToVideoReferencePipeline, WanVideoToVideoReferencePipeline
from diffusers_wan_ext.schedulers import WanFlowMatchScheduler

from .core import GoldenCase, runner
from .dit import load_case_dit

# ------------------------------------------------------------------------------------------------ helpers


@dataclass
class _Call:
    label: str
    hidden_states: torch.Tensor
    timestep: torch.Tensor
    context: torch.Tensor
    output: torch.Tensor


@dataclass
class _Step:
    timestep: torch.Tensor | None = None
    calls: list[_Call] = field(default_factory=list)
    guided: torch.Tensor | None = None
    latents: torch.Tensor | None = None


class LoopRecorder:
    """Record a pipeline's denoising loop without changing it.

    ``experts`` maps a label to each transformer the pipeline may call.  Use as a context manager and pass
    :meth:`callback` as ``callback_on_step_end``.
    """

    def __init__(self, pipe, experts: dict[str, torch.nn.Module], posi: torch.Tensor, nega: torch.Tensor | None):
        self.pipe, self.experts, self.posi, self.nega = pipe, experts, posi, nega
        self.steps: list[_Step] = []
        self._pending = _Step()
        self._handles: list[Any] = []

    # hooks
    def _forward_hook(self, label):
        def hook(module, args, kwargs, output):
            names = ("hidden_states", "timestep", "encoder_hidden_states")
            vals = {n: kwargs[n] if n in kwargs else args[i] for i, n in enumerate(names)}
            out = output[0] if isinstance(output, (tuple, list)) else output.sample
            self._pending.calls.append(_Call(
                label, vals["hidden_states"].detach().clone(), vals["timestep"].detach().clone(),
                vals["encoder_hidden_states"], out.detach().clone(),
            ))

        return hook

    def __enter__(self):
        for label, model in self.experts.items():
            self._handles.append(model.register_forward_hook(self._forward_hook(label), with_kwargs=True))
        scheduler = self.pipe.scheduler
        step = scheduler.step

        def step_spy(model_output, timestep, sample, *args, **kwargs):
            self._pending.guided = model_output.detach().clone()
            return step(model_output, timestep, sample, *args, **kwargs)

        scheduler.step = step_spy  # instance attribute shadows the method; removed on exit
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self.pipe.scheduler.__dict__.pop("step", None)
        return False

    def callback(self, pipe, i, t, callback_kwargs):
        self._pending.timestep = torch.as_tensor(t).detach().clone()
        self._pending.latents = callback_kwargs["latents"].detach().clone()
        self.steps.append(self._pending)
        self._pending = _Step()
        return {}

    # views
    def _branch(self, step: _Step, context: torch.Tensor) -> _Call:
        hits = [c for c in step.calls if c.context.shape == context.shape and torch.equal(c.context, context)]
        if len(hits) != 1:
            raise AssertionError(f"expected one transformer call with this context per step, got {len(hits)}")
        return hits[0]

    def cond(self, step: _Step) -> _Call:
        return self._branch(step, self.posi)

    def uncond(self, step: _Step) -> _Call:
        return self._branch(step, self.nega)

    def stacked(self) -> dict[str, torch.Tensor]:
        """The per-step tensors every loop case reports, stacked on a leading step axis."""
        return {
            "latents_per_step": torch.stack([s.latents for s in self.steps]),
            "noise_pred_posi": torch.stack([self.cond(s).output for s in self.steps]),
            "noise_pred_nega": torch.stack([self.uncond(s).output for s in self.steps]),
            "noise_pred_cfg": torch.stack([s.guided for s in self.steps]),
        }

    def schedule(self, scheduler) -> dict[str, torch.Tensor]:
        """The timesteps the loop ran and the scheduler sigma of each."""
        ts = torch.stack([s.timestep for s in self.steps])
        sig = torch.stack([scheduler.sigmas[scheduler.index_for_timestep(t)] for t in ts])
        return {"timesteps": ts, "sigmas": sig}

    def guidance_per_step(self) -> list[float]:
        """The guidance scale the pipeline applied at each step, measured from its tensors (least squares of
        ``guided - uncond`` on ``cond - uncond``)."""
        out = []
        for s in self.steps:
            c, u = self.cond(s).output.double(), self.uncond(s).output.double()
            d = c - u
            out.append(float(((s.guided.double() - u) * d).sum() / (d * d).sum()))
        return out

    def experts_per_step(self) -> list[str]:
        labels = []
        for s in self.steps:
            used = {c.label for c in s.calls}
            if len(used) != 1:
                raise AssertionError(f"a step called {sorted(used)}")
            labels.append(used.pop())
        return labels


def _dit_entries(case: GoldenCase) -> list[tuple[str, str, dict]]:
    """(label, weights file, original config) per DiT of a loop case.  ``weights`` maps file -> description; an
    expert's config sits under its release folder name (``high_noise_model`` ...), the label drops ``_model``."""
    entries = []
    for file, desc in case.manifest["weights"].items():
        folder = str((desc or {}).get("release_folder", "")).strip("/")
        cfg = case.config.get(folder, case.config) if folder else case.config
        label = folder[: -len("_model")] if folder.endswith("_model") else (folder or "dit")
        entries.append((label, file, cfg))
    return entries


def _single_dit(case: GoldenCase):
    entries = _dit_entries(case)
    if len(entries) != 1:
        raise AssertionError(f"{case.name}: expected one DiT weights file, got {[e[1] for e in entries]}")
    _, file, cfg = entries[0]
    return load_case_dit(case, file, cfg)


def _select(case: GoldenCase, results: dict[str, Any]) -> dict[str, Any]:
    return {k: results[k] for k in case.manifest["outputs"] if k in results}


def _call_kwargs(case: GoldenCase) -> dict[str, Any]:
    x, call = case.inputs, case.value("pipeline_call")
    return dict(
        prompt_embeds=x["context_posi"],
        negative_prompt_embeds=x["context_nega"],
        height=int(call["height"]),
        width=int(call["width"]),
        num_inference_steps=int(case.value("num_inference_steps")),
        guidance_scale=float(case.value("cfg_scale")),
        output_type="latent",
        return_dict=False,
    )


def _no_progress(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ------------------------------------------------------------------------------------------------ runners


@runner("scheduler_t2v")
def run_t2v(case: GoldenCase, tmp_path) -> dict:
    strength = case.manifest["inputs"].get("denoising_strength", {}).get("value", 1.0)
    if float(strength) != 1.0:
        raise AssertionError(f"{case.name}: text-to-video with denoising_strength {strength}")
    x = case.inputs
    dit = _single_dit(case)
    scheduler = WanFlowMatchScheduler(shift=float(case.value("sigma_shift")))
    pipe = _no_progress(WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=scheduler, transformer=dit))
    with LoopRecorder(pipe, {"dit": dit}, x["context_posi"], x["context_nega"]) as rec:
        final = pipe(latents=x["noise"], num_frames=int(case.value("pipeline_call")["num_frames"]),
                     callback_on_step_end=rec.callback, **_call_kwargs(case))[0]
    return _select(case, {**rec.schedule(pipe.scheduler), **rec.stacked(), "latents_final": final})


@runner("scheduler_v2v")
def run_v2v(case: GoldenCase, tmp_path) -> dict:
    x = case.inputs
    dit = _single_dit(case)
    scheduler = WanFlowMatchScheduler(shift=float(case.value("sigma_shift")))
    pipe = _no_progress(WanVideoToVideoReferencePipeline(
        tokenizer=None, text_encoder=None, transformer=dit, vae=None, scheduler=scheduler
    ))
    with LoopRecorder(pipe, {"dit": dit}, x["context_posi"], x["context_nega"]) as rec:
        final = pipe(video_latents=x["input_latents"], noise=x["noise"],
                     denoising_strength=float(case.value("denoising_strength")),
                     callback_on_step_end=rec.callback, cfg_batching=False, **_call_kwargs(case))[0]
    first_input = rec.cond(rec.steps[0]).hidden_states  # the start latents the pipeline built
    return _select(case, {**rec.schedule(pipe.scheduler), **rec.stacked(), "latents_final": final,
                          "latents_initial": first_input})


@runner("moe_switch")
def run_moe(case: GoldenCase, tmp_path) -> dict:
    x, cfg = case.inputs, case.config
    experts = {label: load_case_dit(case, file, c) for label, file, c in _dit_entries(case)}
    high = [k for k in experts if "high" in k]
    low = [k for k in experts if "low" in k]
    if len(experts) != 2 or len(high) != 1 or len(low) != 1:
        raise AssertionError(f"{case.name}: expected a high-noise and a low-noise expert, got {sorted(experts)}")
    high, low = high[0], low[0]
    scheduler = WanFlowMatchScheduler(shift=float(case.value("sigma_shift")))
    pipe = _no_progress(WanPipeline(
        tokenizer=None, text_encoder=None, vae=None, scheduler=scheduler, transformer=experts[high],
        transformer_2=experts[low], boundary_ratio=float(case.value("switch_DiT_boundary")),
    ))
    kwargs = dict(latents=x["noise"], num_frames=int(case.value("pipeline_call")["num_frames"]), **_call_kwargs(case))

    # DiffSynth-Studio: one cfg_scale for both experts (stock default: guidance_scale_2 = guidance_scale)
    with LoopRecorder(pipe, {high: experts[high], low: experts[low]}, x["context_posi"], x["context_nega"]) as rec:
        final = pipe(callback_on_step_end=rec.callback, **kwargs)[0]

    results = {
        **rec.schedule(pipe.scheduler), **rec.stacked(), "latents_final": final,
        "expert_per_step": rec.experts_per_step(),
        "boundary_timestep": float(pipe.config.boundary_ratio * pipe.scheduler.config.num_train_timesteps),
    }
    # original Wan2.2: sample_guide_scale = (low, high); high-noise expert -> guidance_scale, low -> guidance_scale_2
    dual_outputs = {"latents_final_original_dual_guidance", "guidance_per_step_original_rule"}
    if dual_outputs & set(case.manifest["outputs"]):
        if "original_sample_guide_scale(low,high)" not in cfg:
            return {"__skip__": "the dual-guidance outputs need original_config's "
                                "original_sample_guide_scale(low,high)"}
        g_low, g_high = cfg["original_sample_guide_scale(low,high)"]
        dual_kwargs = {**kwargs, "guidance_scale": float(g_high)}
        with LoopRecorder(pipe, {high: experts[high], low: experts[low]}, x["context_posi"], x["context_nega"]) as rec2:
            final_dual = pipe(guidance_scale_2=float(g_low), callback_on_step_end=rec2.callback, **dual_kwargs)[0]
        if rec2.experts_per_step() != rec.experts_per_step():
            raise AssertionError("the expert schedule depends on the guidance rule")
        results.update(latents_final_original_dual_guidance=final_dual,
                       guidance_per_step_original_rule=rec2.guidance_per_step())
    return _select(case, results)


def _config_only_vae(latents: torch.Tensor, call: dict) -> AutoencoderKLWan:
    """A tiny ``AutoencoderKLWan`` whose CONFIG matches the case (``z_dim``, scale factors read off the latent and
    pixel shapes); the pipeline reads only its config.  Running its encoder or decoder raises."""
    c, t_lat, h, w = latents.shape[1:]
    height, width, frames = int(call["height"]), int(call["width"]), int(call["num_frames"])
    if height % h or width % w or height // h != width // w:
        raise AssertionError(f"pixel size {height}x{width} is not a common multiple of the latent grid {h}x{w}")
    temporal = (frames - 1) // (t_lat - 1) if t_lat > 1 else 4
    vae = AutoencoderKLWan(base_dim=4, z_dim=c, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           latents_mean=[0.0] * c, latents_std=[1.0] * c,
                           scale_factor_spatial=height // h, scale_factor_temporal=temporal)

    def forbid(module, args):
        raise AssertionError("the VAE must not run: the case gives latents")

    vae.encoder.register_forward_pre_hook(forbid)
    vae.decoder.register_forward_pre_hook(forbid)
    return vae


@runner("ti2v_first_frame")
def run_ti2v(case: GoldenCase, tmp_path) -> dict:
    x = case.inputs
    call = case.value("pipeline_call")
    dit = _single_dit(case)
    scheduler = WanFlowMatchScheduler(shift=float(case.value("sigma_shift")))
    pipe = _no_progress(WanImageToVideoReferencePipeline(
        tokenizer=None, text_encoder=None, vae=_config_only_vae(x["noise"], call), scheduler=scheduler,
        transformer=dit, expand_timesteps=True,
    ))
    with LoopRecorder(pipe, {"dit": dit}, x["context_posi"], x["context_nega"]) as rec:
        final = pipe(image_latents=x["first_frame_latents"], latents=x["noise"], num_frames=int(call["num_frames"]),
                     callback_on_step_end=rec.callback, cfg_batching=False, **_call_kwargs(case))[0]
    per_token = torch.stack([rec.cond(s).timestep[0] for s in rec.steps])  # [N, L] as the DiT received it
    for s in rec.steps:  # both CFG branches see the same per-token timesteps
        if not torch.equal(rec.uncond(s).timestep, rec.cond(s).timestep):
            raise AssertionError("cond / uncond timesteps differ")
    return _select(case, {
        **rec.schedule(pipe.scheduler), **rec.stacked(), "latents_final": final,
        "latents_initial": rec.cond(rec.steps[0]).hidden_states,
        "timestep_per_token": per_token,
        "tokens_per_latent_frame": int((per_token[0] == 0).sum()),
    })
