"""GPU check of the fused block norms (issue 4): kernel against the stock expression per case, and a 2-layer model
with 14B widths, eager, stock vs fused-norm forward, both against an fp32 copy. Prints relative errors."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for _common.py
from _common import DIT_CONFIGS  # noqa: E402

from diffusers_wan_ext.ops.layer_norm_mod import ln_modulate, ln_modulate_reference
from diffusers_wan_ext.runtime.speed import fuse_block_norms

torch.manual_seed(0)
dev = "cuda"


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


for channels in (5120, 1536):
    x = (torch.randn(1, 4000, channels, device=dev) * 4 + 1).bfloat16()
    r = torch.randn(1, 4000, channels, device=dev).bfloat16()
    mods = torch.randn(1, 6, channels, device=dev) * 0.1
    w, b = (torch.randn(channels, device=dev).bfloat16() for _ in range(2))
    for tag, args in (("k1", (None, None, mods[:, 1:2], mods[:, 0:1], None, None)),
                      ("kb", (r, mods[:, 2:3], None, None, w, b)), ("kc", (r, None, mods[:, 4:5], mods[:, 3:4], None, None))):
        got, want = ln_modulate(x, *args, 1e-6), ln_modulate_reference(x, *args, 1e-6)
        got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
        print(channels, tag, [f"{rel(u, v):.2e}" for u, v in zip(got, want)], flush=True)

from diffusers import WanTransformer3DModel

cfg = dict(DIT_CONFIGS["14b"], num_layers=2)
model = WanTransformer3DModel(**cfg).to(dev).eval()
ref32 = model
m16 = WanTransformer3DModel(**cfg).to(dev).eval()
m16.load_state_dict(model.state_dict())
m16 = m16.to(torch.bfloat16)
x = torch.randn(1, 16, 5, 30, 40, device=dev)
t = torch.tensor([700.0], device=dev)
ctx = torch.randn(1, 512, 4096, device=dev)
with torch.no_grad():
    want = ref32(x, t, ctx, return_dict=False)[0].float()
    stock = m16(x.bfloat16(), t, ctx.bfloat16(), return_dict=False)[0].float()
    print("patched blocks", fuse_block_norms(m16))
    ours = m16(x.bfloat16(), t, ctx.bfloat16(), return_dict=False)[0].float()
print(f"stock bf16 vs fp32 {rel(stock, want):.2e} | fused norms bf16 vs fp32 {rel(ours, want):.2e} | "
      f"fused vs stock {rel(ours, stock):.2e}", flush=True)

# compiled: optimize_transformer with and without the fused norms, against the fp32 eager output
from diffusers_wan_ext.runtime import optimize_transformer

for blk in m16.blocks:
    del blk.forward
for fused in (False, True):
    m = WanTransformer3DModel(**cfg).to(dev).eval()
    m.load_state_dict(model.state_dict())
    m = m.to(torch.bfloat16)
    rep = optimize_transformer(m, fused_norms=fused, verbose=False)
    with torch.no_grad():
        out = m(x.bfloat16(), t, ctx.bfloat16(), return_dict=False)[0].float()
        out2 = m(x.bfloat16(), t, ctx.bfloat16(), return_dict=False)[0].float()
    print(f"compiled fused_norms={fused}: vs fp32 {rel(out, want):.2e} vs stock eager bf16 {rel(out, stock):.2e} "
          f"second call vs first {rel(out2, out):.2e} {rep}", flush=True)
    del m
    torch._dynamo.reset()
