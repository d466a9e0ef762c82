"""Wan-Fun conditioning case: Fun-Control ``y`` (in_dim 48 / 52), Fun-Camera Plücker embedding, its packed 24-channel
input, ``y`` (in_dim 32 / 36) and the camera ``control_adapter`` forward, built with our helpers
(:mod:`diffusers_wan_ext.pipelines.fun_conditioning`, :mod:`diffusers_wan_ext.utils.camera`) from the uint8 inputs and
the VAE our converter produced.  Sizes come from the fixture (manifest ``original_config`` / tensors)."""

from __future__ import annotations

import re

import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from diffusers_wan_ext.models.camera_adapter import WanCameraControlAdapter
from diffusers_wan_ext.pipelines.fun_conditioning import fun_camera_condition, fun_control_condition, i2v_condition
from diffusers_wan_ext.utils.media import encode_video, load_image, load_video_frames
from diffusers_wan_ext.utils.camera import (
    DEFAULT_CAMERA_SPEED,
    camera_control_latents,
    camera_plucker_embedding,
    generate_camera_coordinates,
    pack_camera_latents,
)

from .core import GoldenCase, runner
from .vae import load_case_vae

_ADAPTER_PREFIX = "control_adapter."


def _split_weight_files(case: GoldenCase):
    """(control-adapter file, VAE file) among the manifest's ``weights``, told apart by their keys."""
    adapter = vae = None
    for path in case.weight_paths():
        with safe_open(str(path), "pt") as f:
            is_adapter = any(k.startswith(_ADAPTER_PREFIX) for k in f.keys())
        if is_adapter:
            adapter = path
        else:
            vae = path
    assert adapter is not None and vae is not None, \
        f"expected a control-adapter and a VAE file in {case.weight_paths()}"
    return adapter, vae


def _load_adapter(path, cfg: dict, in_channels: int) -> WanCameraControlAdapter:
    """The camera adapter; its pixel-unshuffle factor ``d`` from the manifest, else from the weights: the first conv
    takes ``in_channels * d^2`` channels (``in_channels``: those of the packed camera input)."""
    sd = {k[len(_ADAPTER_PREFIX):]: v for k, v in load_file(str(path)).items() if k.startswith(_ADAPTER_PREFIX)}
    conv = sd["conv.weight"]  # [dim, in_channels * d^2, kh, kw]
    down = cfg.get("control_adapter", {}).get("pixel_unshuffle")
    down = int(down) if down is not None else round((conv.shape[1] / in_channels) ** 0.5)
    n_blocks = len({k.split(".")[1] for k in sd if k.startswith("residual_blocks.")})
    adapter = WanCameraControlAdapter(in_channels=conv.shape[1] // down**2, out_channels=conv.shape[0],
                                      kernel_size=tuple(conv.shape[-2:]), downscale_factor=down,
                                      num_residual_blocks=n_blocks)
    adapter.load_state_dict(sd, strict=True)
    return adapter.eval()


@runner("fun_condition")
def run_fun_condition(case: GoldenCase, tmp_path) -> dict:
    cfg = case.config
    needed = [k for k in ("image_uint8", "image", "end_image_uint8", "control_video_uint8") if k not in case.inputs]
    needed += [] if "camera" in case.manifest["inputs"] else ["camera"]
    if needed:
        return {"__skip__": f"this fixture set's fun_condition has no input(s) {needed}"}
    # sizes: the manifest's call values, else the control video's frames and the image's pixels
    f = int(cfg.get("num_frames", case.inputs["control_video_uint8"].shape[0]))
    pixels = case.inputs["image_uint8"].shape
    h, w = int(cfg.get("height", pixels[0])), int(cfg.get("width", pixels[1]))
    adapter_file, vae_file = _split_weight_files(case)
    vae = load_case_vae(case, vae_file).eval()
    z_dim = int(vae.config.z_dim)  # noisy-latent channels = control-latent channels

    def in_dim(output: str) -> int:  # "y_fun_control_in48_..." -> 48
        return int(re.search(r"_in(\d+)", output).group(1))

    # Pixels: the uint8 inputs through our loaders (PIL image route, numpy video route).
    image = load_image(Image.fromarray(case.inputs["image_uint8"].numpy()), h, w)
    torch.testing.assert_close(image, case.inputs["image"], rtol=0, atol=0)  # same mapping as the reference
    end_image = load_image(Image.fromarray(case.inputs["end_image_uint8"].numpy()), h, w, name="end_image")
    control_video = load_video_frames(case.inputs["control_video_uint8"].numpy(), f, h, w)
    assert end_image.shape == image.shape

    out: dict = {}
    with torch.no_grad():
        control = encode_video(vae, control_video)
        out["control_latents"] = control
        y_i2v = i2v_condition(vae, image, f)  # the y that WanVideoUnit_ImageEmbedderVAE hands to FunControl
        # FLF2V y must build too (mask with the last frame set); not an output of this case.
        y_flf = i2v_condition(vae, image, f, end_image=end_image)
        mask_channels = y_flf.shape[1] - z_dim  # one per pixel frame of a latent frame (the VAE's temporal stride)
        assert bool((y_flf[:, mask_channels - 1, -1] == 1).all()) and torch.equal(y_flf[:, :, 0], y_i2v[:, :, 0])

        # Fun-Control: y_channels = in_dim - z (noisy latents) - z (control latents), as DiffSynth's y_dim.
        # Wan2.1 Fun-Control (in_dim 48 -> y_channels 16: image latents without the mask); Wan2.2 with image (52 -> 20).
        # The in_dim comes from each output's name, so a set with other widths (other "_in<N>" names) runs too.
        fun_control = [n for n in case.manifest["outputs"] if n.startswith("y_fun_control_in")]
        for name in fun_control:
            if name.endswith(("_with_image", "_with_image_clip")):
                out[name] = fun_control_condition(control, in_dim(name) - 2 * z_dim, y_i2v)
        # Wan2.2 Fun-A14B-Control (in_dim 52 -> y_channels 20).  DiffSynth drops the image part when the model has no
        # CLIP (the Wan2.2 A14B Fun models have none), so its "with image, no CLIP" output is cat(control, zeros(20)),
        # which is our call *without* an image.  Given an image we keep mask + image latents like VideoX-Fun: that is
        # the "_clip" output above.
        for name in fun_control:
            if name.endswith(("_no_image", "_with_image_no_clip")):
                out[name] = fun_control_condition(control, in_dim(name) - 2 * z_dim)

        # Fun-Camera.
        cam = case.value("camera")
        speed, origin = cam.get("speed", DEFAULT_CAMERA_SPEED), cam.get("origin")
        coords = generate_camera_coordinates(cam["direction"], f, speed, origin)
        out["camera_coordinates"] = coords
        plucker = camera_plucker_embedding(coords, h, w)
        out["camera_plucker"] = plucker
        packed = pack_camera_latents(plucker)
        one_call = camera_control_latents(f, h, w, direction=cam["direction"], speed=speed, origin=origin)
        torch.testing.assert_close(one_call, packed, rtol=0, atol=0)
        out["control_camera_latents_input"] = one_call
        # Fun-Camera: y_channels = in_dim - z (32 -> 16: image latents in frame 0; 36 -> 20: mask + image latents).
        for name in [n for n in case.manifest["outputs"] if n.startswith("y_camera_in")]:
            out[name] = fun_camera_condition(vae, image, f, y_channels=in_dim(name) - z_dim)

        adapter = _load_adapter(adapter_file, cfg, in_channels=one_call.shape[1])
        out["control_adapter_out"] = adapter(one_call)
    unknown = [n for n in case.manifest["outputs"] if n not in out]
    if unknown:
        return {"__skip__": f"no recipe for output(s) {unknown}"}
    return out
