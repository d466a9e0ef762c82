"""The Wan-Fun family (PAI / VideoX-Fun): InP, Control, Control-Camera -- Wan2.1, Fun-V1.1 and Wan2.2-Fun-A14B.

Fun-InP has the I2V DiT layout (the converter tells them apart by folder name or ``--variant``); Fun-Control adds
control-video channels (and, from V1.1, a reference-image ``ref_conv``); Fun-Control-Camera a ``control_adapter`` on
a Plücker-ray map.  :class:`~diffusers_wan_ext.WanFunTransformer3DModel` keeps the release names of those modules.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch

from ..conversion.dit import DitExtension, DitInfo, DitShape, block_indices
from ..models import WanFunTransformer3DModel
from ..pipelines import WanFunCameraControlPipeline, WanFunControlPipeline, WanFunInpaintPipeline
from ..utils.camera import DEFAULT_CAMERA_SPEED, camera_control_latents
from ..utils.io import ConversionError
from .base import Conditioning, ExtraInput, GenerateInput, ModelFamily, TinyArch, WanVariant
from .wan_core import core_model_class

__all__ = ["FunFamily", "encode_fun_condition"]

#: ``(in_dim - out_dim, CLIP branch)`` -> Fun-Control without ``ref_conv``: 32 = 16 control + 16 image latents
#: (Wan2.1 Fun-Control); 36 = 16 control + 20 (Wan2.2 Fun-Control).
CONTROL_CHANNELS: dict[tuple[int, bool], str] = {(32, True): "fun-control", (36, False): "fun-control"}
#: training inputs -> ``prepare_condition`` arguments of the Fun pipelines
FUN_ARGUMENTS = {"input_image": "image", "end_image": "end_image", "control_video": "control_video",
                 "reference_image": "reference_image"}
CAMERA_INPUTS = ("camera_control_direction", "camera_control_speed", "camera_control_origin")


def _ref_conv_config(sd, shape: DitShape) -> dict[str, Any]:
    w = sd["ref_conv.weight"]
    if w.ndim != 4 or w.shape[0] != shape.dim or tuple(w.shape[2:]) != tuple(shape.patch_size[1:]):
        raise ConversionError(
            f"ref_conv.weight {tuple(w.shape)}: expected [{shape.dim}, C, {shape.patch_size[1]}, "
            f"{shape.patch_size[2]}] (a Conv2d with the DiT's spatial patch)"
        )
    return {"ref_conv_in_channels": int(w.shape[1])}


def _camera_config(sd, shape: DitShape) -> dict[str, Any]:
    w = sd["control_adapter.conv.weight"]
    in_ch = int(shape.cfg.get("in_dim_control_adapter", 24))
    packed = int(w.shape[1]) if w.ndim == 4 else -1
    factor = int(round(math.sqrt(packed / in_ch))) if packed > 0 else 0
    if w.ndim != 4 or w.shape[0] != shape.dim or factor * factor * in_ch != packed:
        raise ConversionError(
            f"control_adapter.conv.weight {tuple(w.shape)}: expected [{shape.dim}, {in_ch} * f * f, kh, kw] "
            f"(camera adapter on a {in_ch}-channel Plücker map, pixel-unshuffle factor f)"
        )
    blocks = block_indices(sd, "control_adapter.residual_blocks")
    if blocks != [0]:
        raise ConversionError(
            f"control_adapter has residual blocks {blocks}; every Fun Control-Camera release has exactly one "
            "(control_adapter.residual_blocks.0.*)"
        )
    return {"control_adapter_in_channels": in_ch,
            "control_adapter_downscale_factor": int(shape.cfg.get("downscale_factor_control_adapter", factor))}


def _config(shape: DitShape) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "ref_conv.weight" in shape.sd:
        out.update(_ref_conv_config(shape.sd, shape))
    if "control_adapter.conv.weight" in shape.sd:
        out.update(_camera_config(shape.sd, shape))
    return out


def _detect(shape: DitShape, ext: dict[str, Any]) -> str | None:
    if "control_adapter_in_channels" in ext:
        return "fun-camera"
    if "ref_conv_in_channels" in ext:
        return "fun-control-ref"
    if shape.pos_len is None:
        return CONTROL_CHANNELS.get((shape.extra_channels, shape.has_img))
    return None


def _model_class(info: DitInfo) -> type:
    if info.config.get("ref_conv_in_channels") or info.config.get("control_adapter_in_channels"):
        return WanFunTransformer3DModel
    return core_model_class(info)


def encode_fun_condition(builder, sample: dict, inputs, num_frames: int, height: int, width: int) -> None:
    """Training inputs of an I2V / Fun model through its pipeline's ``prepare_condition`` (and CLIP)."""
    pipe = builder.pipe
    accepted = inspect.signature(pipe.prepare_condition).parameters
    kwargs: dict[str, Any] = {}
    for name, arg in FUN_ARGUMENTS.items():
        if name in builder.extra_inputs and arg in accepted:
            kwargs[arg] = (builder.video if name == "control_video" else builder.image)(sample, name)
    if "control_camera_latents" in accepted:
        kwargs["control_camera_latents"] = camera_control_latents(
            num_frames, height, width, direction=sample["camera_control_direction"],
            speed=sample.get("camera_control_speed", DEFAULT_CAMERA_SPEED), origin=sample.get("camera_control_origin"),
        )
    condition = pipe.prepare_condition(height=height, width=width, num_frames=num_frames, device=builder.device,
                                       **kwargs)
    inputs.y = condition.y
    inputs.transformer_kwargs = {k: v for k, v in condition.transformer_kwargs.items() if v is not None}
    if pipe.has_clip_branch:
        if condition.clip_image is None:
            inputs.image_embeds = pipe._zero_clip_features(builder.device)
        else:
            embeds = pipe.encode_clip_image(condition.clip_image, builder.device)
            if getattr(pipe.transformer.config, "pos_embed_seq_len", None) and "end_image" in kwargs:
                # FLF2V: CLIP features of the first and the last frame, concatenated
                embeds = torch.cat([embeds, pipe.encode_clip_image(kwargs["end_image"], builder.device)], dim=1)
            inputs.image_embeds = embeds


INPAINT = Conditioning("image-to-video (I2V / FLF2V / Fun-InP)", WanFunInpaintPipeline, required=("input_image",),
                       optional=("end_image",), encode=encode_fun_condition)
CONTROL_21 = Conditioning("Wan2.1 Fun-Control", WanFunControlPipeline, required=("control_video",),
                          optional=("input_image", "reference_image"), encode=encode_fun_condition)
CONTROL_22 = Conditioning("Wan2.2 Fun-Control", WanFunControlPipeline, required=("control_video",),
                          optional=("input_image", "reference_image"), encode=encode_fun_condition)
CAMERA_21 = Conditioning("Wan2.1 Fun-Camera", WanFunCameraControlPipeline,
                         required=("input_image", "camera_control_direction"), optional=CAMERA_INPUTS[1:],
                         encode=encode_fun_condition)
CAMERA_22 = Conditioning("Wan2.2 Fun-Camera", WanFunCameraControlPipeline,
                         required=("input_image", "camera_control_direction"), optional=CAMERA_INPUTS[1:],
                         encode=encode_fun_condition)
#: ``(y channels, has a camera control_adapter)`` -> conditioning (stock I2V checkpoints use Fun-InP's: mask + VAE
#: of the first frame, CLIP of the first frame with the references' preprocessing)
Y_CONDITIONING: dict[tuple[int, bool], Conditioning] = {
    (20, False): INPAINT, (32, False): CONTROL_21, (36, False): CONTROL_22, (16, True): CAMERA_21,
    (20, True): CAMERA_22,
}


def _variant(name, arch, release, dim, layers, pipeline, **kw) -> WanVariant:
    return WanVariant(name, arch, release, dim=dim, num_layers=layers, pipeline=pipeline, **kw)


# Sampling defaults of VideoX-Fun's predict_* examples.
_WAN21 = dict(image_encoder=True, flow_shift=3.0, guidance_scale=6.0)
_WAN22 = dict(experts=2, boundary_ratio=0.9, flow_shift=5.0, guidance_scale=6.0)


class FunFamily(ModelFamily):
    name = "fun"
    title = "Wan-Fun (InP, Control, Control-Camera; Wan2.1, V1.1, Wan2.2-A14B)"
    variants = (
        _variant("wan2.1-fun-1.3b-inp", "i2v", "PAI/Wan2.1-Fun-1.3B-InP", 1536, 30, "WanFunInpaintPipeline", **_WAN21,
                 aliases=("wan2.1-fun-v1.1-1.3b-inp",), file_hints=(("fun", "1.3b", "inp"),),
                 notes="V1.1-1.3B-InP has the same layout: --variant picks the name"),
        _variant("wan2.1-fun-14b-inp", "i2v", "PAI/Wan2.1-Fun-14B-InP", 5120, 40, "WanFunInpaintPipeline", **_WAN21,
                 aliases=("wan2.1-fun-v1.1-14b-inp",), file_hints=(("fun", "inp"),),
                 notes="same layout as Wan2.1-I2V-14B: detected from a folder name containing 'Fun' or chosen by "
                       "--variant"),
        _variant("wan2.1-fun-1.3b-control", "fun-control", "PAI/Wan2.1-Fun-1.3B-Control", 1536, 30,
                 "WanFunControlPipeline", **_WAN21),
        _variant("wan2.1-fun-14b-control", "fun-control", "PAI/Wan2.1-Fun-14B-Control", 5120, 40,
                 "WanFunControlPipeline", **_WAN21),
        _variant("wan2.1-fun-v1.1-1.3b-control", "fun-control-ref", "PAI/Wan2.1-Fun-V1.1-1.3B-Control", 1536, 30,
                 "WanFunControlPipeline", **_WAN21),
        _variant("wan2.1-fun-v1.1-14b-control", "fun-control-ref", "PAI/Wan2.1-Fun-V1.1-14B-Control", 5120, 40,
                 "WanFunControlPipeline", **_WAN21),
        _variant("wan2.1-fun-v1.1-1.3b-control-camera", "fun-camera", "PAI/Wan2.1-Fun-V1.1-1.3B-Control-Camera",
                 1536, 30, "WanFunCameraControlPipeline", **_WAN21),
        _variant("wan2.1-fun-v1.1-14b-control-camera", "fun-camera", "PAI/Wan2.1-Fun-V1.1-14B-Control-Camera",
                 5120, 40, "WanFunCameraControlPipeline", **_WAN21),
        _variant("wan2.2-fun-a14b-inp", "i2v-noclip", "PAI/Wan2.2-Fun-A14B-InP", 5120, 40, "WanFunInpaintPipeline",
                 **_WAN22, file_hints=(("wan2.2", "fun", "inp"),),
                 notes="same layout as Wan2.2-I2V-A14B: detected from a folder name containing 'Fun' or chosen by "
                       "--variant"),
        _variant("wan2.2-fun-a14b-control", "fun-control-ref", "PAI/Wan2.2-Fun-A14B-Control", 5120, 40,
                 "WanFunControlPipeline", **_WAN22),
        _variant("wan2.2-fun-a14b-control-camera", "fun-camera", "PAI/Wan2.2-Fun-A14B-Control-Camera", 5120, 40,
                 "WanFunCameraControlPipeline", **_WAN22),
    )
    dit = DitExtension(
        name="fun", arches=("fun-control", "fun-control-ref", "fun-camera"),
        layouts="Fun-Control 48/16 with CLIP or 52/16 without, Fun-Camera 32 or 36 + control_adapter.*",
        top_level_keys=(("ref_conv", "ref_conv"), ("control_adapter", "control_adapter")),
        config=_config, detect=_detect, model_class=_model_class, priority=40,
    )
    model_classes = (WanFunTransformer3DModel,)
    pipeline_classes = (WanFunInpaintPipeline, WanFunControlPipeline, WanFunCameraControlPipeline)
    tiny_arches = {
        "fun-control": TinyArch("i2v", 48, 16, clip=True),
        "fun-control-ref": TinyArch("i2v", 48, 16, clip=True),
        "fun-camera": TinyArch("i2v", 32, 16, clip=True),
    }
    #: Wan2.2-Fun A14B (two experts): no CLIP branch, 20-channel mask + image condition
    tiny_arches_two_experts = {
        "fun-control-ref": TinyArch("i2v", 52, 16),
        "fun-camera": TinyArch("i2v", 36, 16),
    }
    conditionings = tuple(Y_CONDITIONING.values())
    generate_inputs = (
        GenerateInput("--control-video", "control_video", "Wan-Fun Control: the control video (num_frames frames of "
                      "height x width: depth, pose, canny ...)"),
        GenerateInput("--reference-image", "reference_image", "Wan-Fun V1.1 / Wan2.2 Control: reference image"),
        GenerateInput("--camera-direction", "camera_control_direction", "Wan-Fun Control-Camera: camera motion "
                      "(Left, Right, Up, Down, LeftUp, LeftDown, RightUp, RightDown, In, Out)", kind="text"),
        GenerateInput("--camera-speed", "camera_control_speed", "Wan-Fun Control-Camera: camera speed", kind="float"),
    )
    #: DiffSynth-Studio's dataset columns of the Fun models (Control, Control-Camera, V1.1 reference image)
    dataset_inputs = {
        "reference_image": ExtraInput("image"),
        "control_video": ExtraInput("video"),
        "camera_control_direction": ExtraInput("str"),
        "camera_control_speed": ExtraInput("float"),
        "camera_control_origin": ExtraInput("floats"),
    }

    def tiny_arch(self, arch: str, experts: int) -> TinyArch:
        """The tiny DiT config of ``arch`` (the Wan2.2 A14B layout for two experts)."""
        table = self.tiny_arches_two_experts if experts == 2 else {}
        return table.get(arch) or self.tiny_arches[arch]

    def tiny_dit_model(self, arch: str, experts: int, kwargs: dict[str, Any]):
        camera = arch == "fun-camera"
        model = WanFunTransformer3DModel(
            **kwargs, ref_conv_in_channels=16 if arch == "fun-control-ref" else None,
            control_adapter_in_channels=24 if camera else None,
        )
        return model, (dict(add_control_adapter=True, in_dim_control_adapter=24) if camera else {})

    def training_conditioning(self, config: Any, expand_timesteps: bool) -> Conditioning | None:
        y_channels = config.in_channels - config.out_channels
        if y_channels == 0 or expand_timesteps:
            return None
        key = (y_channels, bool(getattr(config, "control_adapter_in_channels", None)))
        if key not in Y_CONDITIONING:
            raise ValueError(f"the transformer takes {config.in_channels} input channels ({config.out_channels} "
                             f"latents + {y_channels} conditioning channels), a layout no Wan pipeline conditions")
        return Y_CONDITIONING[key]
