"""``pipelines.call_arguments.forwarded``: what it keeps, and that every forwarding ``__call__`` still covers the
parameters of the routine it forwards to (a parameter the caller lacks would silently keep its default)."""

from __future__ import annotations

import inspect

import pytest
import torch

from diffusers_wan_ext.pipelines.call_arguments import forwarded, keyword_parameters
from diffusers_wan_ext.pipelines.pipeline_wan_ext import WanExtPipeline
from diffusers_wan_ext.pipelines.pipeline_wan_fun_base import WanFunPipelineBase
from diffusers_wan_ext.pipelines.pipeline_wan_fun_camera import WanFunCameraControlPipeline
from diffusers_wan_ext.pipelines.pipeline_wan_fun_control import WanFunControlPipeline
from diffusers_wan_ext.pipelines.pipeline_wan_fun_inpaint import WanFunInpaintPipeline
from diffusers_wan_ext.pipelines.pipeline_wan_speed_control import WanSpeedControlPipeline
from diffusers_wan_ext.pipelines.pipeline_wan_video_as_prompt import WanVideoAsPromptPipeline


def _target(a, b=2, *args, c=3, **kwargs):
    return a, b, c


class _Owner:
    @torch.no_grad()
    def method(self, x, y=1):
        return x, y


def test_forwarded_keeps_the_target_parameters_then_overrides():
    arguments = {"self": object(), "a": 1, "b": 5, "c": 7, "d": 9, "args": (), "kwargs": {}}
    assert forwarded(arguments, _target) == {"a": 1, "b": 5, "c": 7}
    assert forwarded(arguments, _target, b=0, e=4) == {"a": 1, "b": 0, "c": 7, "e": 4}
    assert forwarded({"a": 1}, _target) == {"a": 1}  # b, c keep their defaults


def test_bound_and_decorated_methods():
    owner = _Owner()
    assert keyword_parameters(owner.method) == {"x", "y"}  # self left out, @torch.no_grad followed
    assert keyword_parameters(_Owner.method) == {"self", "x", "y"}
    assert owner.method(**forwarded({"self": owner, "x": 3, "z": 4}, owner.method)) == (3, 1)


def _parameters(function) -> list[str]:
    return [p for p in inspect.signature(function).parameters if p != "self"]


@pytest.mark.parametrize(
    "pipeline", [WanFunInpaintPipeline, WanFunControlPipeline, WanFunCameraControlPipeline, WanVideoAsPromptPipeline]
)
def test_fun_variants_cover_generate(pipeline):
    missing = set(_parameters(WanFunPipelineBase.generate)) - set(_parameters(pipeline.__call__)) - {"condition_inputs"}
    if pipeline is WanVideoAsPromptPipeline:
        missing -= {"guidance_scale_2"}  # one expert only: generate's default
    assert not missing


def test_speed_control_covers_the_parent_call():
    assert set(_parameters(WanExtPipeline.__call__)) <= set(_parameters(WanSpeedControlPipeline.__call__))
