"""Golden parity harness: every case in ``$WAN_GOLDENS_DIR`` (default ``tests/goldens``, the shipped copy of ``../shared/goldens``) through our code.

A case is a folder with ``manifest.json``.  Each runs through our converter and our model / pipeline and is compared
with the reference outputs at the manifest's tolerance.  Cases we do not support yet are *skipped with the reason*;
a case with no runner at all is skipped naming its kind, and so is a case whose fixture set lacks an entry its runner
needs (:class:`~golden_runners.core.MissingFixtureField`; on the shipped set that is a failure).  The runners take
every width from the case's config and every shape from its tensors, so other fixture sets run unchanged.
"""

import pytest
import torch

from golden_runners import RUNNERS, UNSUPPORTED, discover_cases, load_case, compare_outputs
from golden_runners.core import GOLDENS_DIR, SHIPPED_GOLDENS_DIR, MissingFixtureField

CASES = discover_cases()


@pytest.fixture(autouse=True)
def _fp32_exact():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield


def test_goldens_dir_has_cases():
    assert CASES, "no golden cases found: set WAN_GOLDENS_DIR to a fixture set (default tests/goldens)"


@pytest.mark.parametrize("name", CASES or ["<none>"])
def test_golden_case(name, tmp_path):
    if name == "<none>":
        pytest.skip("no golden cases found")
    case = load_case(name)
    fn = RUNNERS.get(name)
    if fn is None and name in UNSUPPORTED:
        pytest.skip(f"{name}: not supported yet - {UNSUPPORTED[name]}")
    if fn is None:
        pytest.skip(f"{name}: no runner for this case (kind {case.manifest.get('kind')!r})")
    try:
        ours = fn(case, tmp_path)
    except MissingFixtureField as e:  # this fixture set lacks an entry the case needs: not run, so never passed
        if GOLDENS_DIR.resolve() == SHIPPED_GOLDENS_DIR.resolve():  # the set the runners were written for is complete
            raise AssertionError(f"{name}: the shipped fixture set must run every case: {e}") from e
        pytest.skip(f"{name}: {e}")
    skip = ours.pop("__skip__", None)
    if skip:
        pytest.skip(f"{name}: {skip}")
    failures = compare_outputs(case, ours)
    assert not failures, f"{name} differs from the reference:\n  " + "\n  ".join(failures)


def test_vae_runner_at_sizes_no_shipped_set_has(tmp_path):
    """The VAE runner on a case our own code writes at other sizes: z_dim 6, spatial stride 4, temporal stride 2, an
    odd 5 x 7 latent grid with tiles of 3 every 2 (6 tiles, last ones clipped).  The tile layouts are written by
    hand; the outputs come from our other code paths (streaming encode / decode rather than the stock ones the runner
    uses), so the runner must take every size from the config and the tensors to match - and a wrong golden fails."""
    import json

    from diffusers import AutoencoderKLWan
    from safetensors.torch import save_file

    from diffusers_wan_ext.conversion.vae import export_vae_state_dict
    from diffusers_wan_ext.vae import decode_unclamped, encode_mean, normalize_latents, tiled_decode, tiled_encode

    torch.manual_seed(0)
    config = dict(base_dim=3, z_dim=6, dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[True, False],
                  scale_factor_temporal=2, scale_factor_spatial=4, latents_mean=[0.1] * 6, latents_std=[0.5] * 6)
    vae = AutoencoderKLWan(**config).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    case_dir = tmp_path / "vae_odd"
    case_dir.mkdir()
    save_file(export_vae_state_dict(vae), str(case_dir / "weights.safetensors"))
    video = torch.rand(1, 3, 5, 20, 28) * 2 - 1  # latent 3 x 5 x 7
    z = torch.randn(1, 6, 3, 5, 7)
    with torch.no_grad():
        mu = encode_mean(vae, video)
        raw = z / (1.0 / torch.tensor(config["latents_std"]).view(1, -1, 1, 1, 1)) + 0.1
        unclamped = decode_unclamped(vae, raw)
        outputs = {"mu_raw": mu, "latent": normalize_latents(vae, mu), "decoded_video": unclamped.clamp(-1, 1),
                   "decoded_video_unclamped": unclamped, "latent_tiled": tiled_encode(vae, video, [3, 3], [2, 2]),
                   "decoded_video_tiled": tiled_decode(vae, z, [3, 3], [2, 2])}
    tensors = {"input.video": video, "input.latent_for_decode": z, **{f"output.{k}": v for k, v in outputs.items()}}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(case_dir / "tensors.safetensors"))
    rows = [[h0, h0 + 3, w0, w0 + 3] for h0 in (0, 2) for w0 in (0, 2, 4)]
    manifest = {
        "case": "vae_odd", "kind": "vae", "weights": {"weights.safetensors": {}},
        "original_config": {"dim": 3, "z_dim": 6, "dim_mult": [1, 2, 2], "num_res_blocks": 1,
                            "temperal_downsample": [True, False], "spatial_factor": 4, "temporal_factor": 2},
        "inputs": {k: {"key": f"input.{k}"} for k in ("video", "latent_for_decode")},
        "outputs": {k: {"key": f"output.{k}"} for k in outputs},
        "tiling": {"encode": {"tile_size_latent": [3, 3], "tile_stride_latent": [2, 2],
                              "tiles_px_h0_h1_w0_w1": [[4 * v for v in r] for r in rows]},
                   "decode": {"tile_size_latent": [3, 3], "tile_stride_latent": [2, 2],
                              "tiles_latent_h0_h1_w0_w1": rows}},
        "latent_normalization": {"mean": config["latents_mean"], "std": config["latents_std"]},  # no release has z 6
        "tolerance": {"rtol": 1e-4, "atol": 1e-5},
    }
    (case_dir / "manifest.json").write_text(json.dumps(manifest))
    case = load_case("vae_odd", root=tmp_path)
    ours = RUNNERS["vae21"](case, tmp_path)
    assert "__skip__" not in ours
    assert compare_outputs(case, ours) == []
    ours["latent_tiled"] = ours["latent_tiled"] + 1e-3  # the comparison can fail
    assert [f.split(":")[0] for f in compare_outputs(case, ours)] == ["latent_tiled"]
