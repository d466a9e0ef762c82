"""Wan2.2-Animate-2 LoRA interop: DiffSynth-Studio's LoRA target names on the Animate-2 transformer (its module
names are not the Wan DiT's: ``self_attn.q`` -> ``self_attn.to_q``, not ``attn1.to_q``), its full fine-tuning of the
self-attention q / k / v (``--trainable_models dit.blocks.N.block.self_attn.q,...``), and ``diffusers-wan generate
--lora`` reading a DiffSynth-format Animate-2 LoRA file through the pipeline's own loader."""

from __future__ import annotations

from pathlib import Path

import imageio
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from diffusers_wan_ext_cli import main
from diffusers_wan_ext.demo import make_tiny_release


@pytest.fixture(scope="module")
def a2_folder(tmp_path_factory) -> Path:
    """A tiny Animate-2 release converted by the CLI (fp32)."""
    release = make_tiny_release(tmp_path_factory.mktemp("a2") / "rel", arch="animate2")
    dst = tmp_path_factory.mktemp("a2-converted") / "out"
    assert main(["convert", str(release), str(dst), "--image-encoder-heads", "2", "--dtype", "fp32"]) == 0
    return dst


def test_generate_cli_reads_a_diffsynth_animate2_lora(a2_folder, tmp_path, capsys):
    """``--lora FILE`` with DiffSynth's Animate-2 keys (``blocks.N.block.self_attn.q.lora_A.default.weight``) loads
    and changes the video; a foreign module name is one error line naming the key."""
    rs = np.random.RandomState(0)
    Image.fromarray(rs.randint(0, 255, (16, 16, 3), np.uint8)).save(tmp_path / "ref.png")
    imageio.mimwrite(tmp_path / "drive.mp4", [rs.randint(0, 255, (16, 16, 3), np.uint8) for _ in range(5)], fps=8)
    g = torch.Generator().manual_seed(1)
    lora = {}
    for block in (0, 1):
        for name in ("self_attn.q", "self_attn.v"):
            lora[f"blocks.{block}.block.{name}.lora_A.default.weight"] = torch.randn(4, 48, generator=g)
            lora[f"blocks.{block}.block.{name}.lora_B.default.weight"] = torch.randn(48, 4, generator=g) * 4
    save_file(lora, str(tmp_path / "a2_lora.safetensors"))
    bad = {"blocks.0.block.self_attn.x.lora_A.default.weight": torch.zeros(4, 48),
           "blocks.0.block.self_attn.x.lora_B.default.weight": torch.zeros(48, 4)}
    save_file(bad, str(tmp_path / "bad_lora.safetensors"))

    def generate(out: str, *extra: str) -> int:
        return main(["generate", "--model", str(a2_folder), "--prompt", "a person", "--height", "16", "--width", "16",
                     "--num-frames", "5", "--steps", "1", "--dtype", "fp32", "--image", str(tmp_path / "ref.png"),
                     "--driving-video", str(tmp_path / "drive.mp4"), "--output", str(tmp_path / out), *extra])

    assert generate("base.mp4") == 0
    assert generate("lora.mp4", "--lora", str(tmp_path / "a2_lora.safetensors")) == 0
    assert "loaded LoRA" in capsys.readouterr().err
    base, adapted = (imageio.v3.imread(tmp_path / f).astype(np.float32) for f in ("base.mp4", "lora.mp4"))
    assert base.shape == adapted.shape == (5, 16, 16, 3)
    assert np.abs(adapted - base).max() > 8
    assert generate("bad.mp4", "--lora", str(tmp_path / "bad_lora.safetensors")) == 2
    err = capsys.readouterr().err
    assert "bad_lora.safetensors" in err and "self_attn.x" in err and "Traceback" not in err, err
    assert not (tmp_path / "bad.mp4").exists()
