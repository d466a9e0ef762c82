"""Token padding for context parallelism when the token count does not divide by the degree.

Diffusers' context-parallel hooks split every planned tensor into equal shards (and assert divisibility).  We add
hooks around them, driven by the same plan, that make any token count work exactly:

* before a split, the tensor is zero-padded along the token dimension to a multiple of the degree (RoPE tables and
  per-token timesteps too);
* every self-attention layer gets an additive key-padding mask (0 / -inf) for its local shard, so the padded tokens
  are never attended to (Ulysses all-gathers the local mask to the full sequence);
* after the gather (``proj_out``), the padding is cut off again.

Padded query rows compute garbage that is dropped; the real tokens' outputs equal the unpadded computation.  When the
token count divides (every released resolution at degrees up to 8), no padding and no mask are used.  Masks are
supported by Ulysses attention only: ring or hybrid degrees with an indivisible token count raise, naming the degrees
to use instead.
"""

from __future__ import annotations

import fnmatch
import inspect

import torch
import torch.nn.functional as F
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.models._modeling_parallel import ContextParallelConfig, ContextParallelInput, ContextParallelOutput

__all__ = ["TokenPadState", "apply_token_padding", "remove_token_padding"]

_PREFIX = "wan_ext_cp_pad"


class TokenPadState:
    """The padding of the current forward: true token count and pad length, shared by a model's pad hooks."""

    def __init__(self, cp_config: ContextParallelConfig, model: torch.nn.Module | None = None,
                 attention: tuple[str, ...] = ()):
        self.cp_config = cp_config
        self.model, self.attention = model, attention
        self.masked = False
        self.degree = cp_config.ring_degree * cp_config.ulysses_degree
        self.valid_len: int | None = None
        self.pad = 0
        self.mask: torch.Tensor | None = None

    def pad_tokens(self, x: torch.Tensor, dim: int, value: float = 0.0) -> torch.Tensor:
        """Record the true length of ``x`` along ``dim`` and zero-pad it to a multiple of the degree."""
        length = x.shape[dim]
        pad = (-length) % self.degree
        if (length, pad) != (self.valid_len, self.pad) or (pad and self.mask is None):
            self.valid_len, self.pad = length, pad
            # built here, outside the (possibly compiled) attention blocks
            self.mask = self._key_mask((length + pad) // self.degree, x.device) if pad else None
            self._sync_mask_hooks()
        if pad == 0:
            return x
        if self.cp_config.ring_degree > 1:
            raise ValueError(
                f"{length} tokens do not divide by the context-parallel degree {self.degree}, and ring attention "
                "cannot mask padding: use a token count divisible by it, or Ulysses only "
                f"(ulysses_degree={self.degree}, ring_degree=1)"
            )
        widths = [0, 0] * (x.ndim - dim - 1) + [0, pad]
        return F.pad(x, widths, value=value)

    def _sync_mask_hooks(self) -> None:
        """Key-mask hooks on the self-attention layers only while a padded token count is in use: with no hooks
        there, regionally compiled blocks stay identical and compile once (as without padding)."""
        if self.model is None or bool(self.pad) == self.masked:
            return
        hook = _KeyMaskHook(self)  # one instance for every layer
        for pattern in self.attention:
            for m in _modules(self.model, pattern):
                if self.pad:
                    _register(m, hook, f"{_PREFIX}_mask")
                else:
                    m._diffusers_hook.remove_hook(f"{_PREFIX}_mask", recurse=False)
        self.masked = bool(self.pad)

    def _key_mask(self, local_len: int, device: torch.device) -> torch.Tensor:
        """Additive key mask ``(1, 1, 1, local_len)`` of this rank's shard: 0 for real tokens, -inf for padding.

        Additive (not boolean), so that no select has to be generated inside compiled attention blocks."""
        rank = self.cp_config._flattened_mesh.get_local_rank()
        positions = torch.arange(rank * local_len, (rank + 1) * local_len, device=device)
        mask = torch.zeros(1, 1, 1, local_len, device=device)
        return mask.masked_fill_((positions >= self.valid_len).view(1, 1, 1, local_len), float("-inf"))


def forward_parameters(cls: type) -> list[str]:
    """Names of ``cls.forward``'s parameters after ``self`` (positions of positional arguments)."""
    return list(inspect.signature(cls.forward).parameters)[1:]


def _arg_index(module: torch.nn.Module, name: str) -> int | None:
    params = forward_parameters(type(module))
    return params.index(name) if name in params else None


class _PadInputsHook(ModelHook):
    """Outer pre-forward hook: pads the planned inputs before Diffusers' split hook shards them."""

    def __init__(self, state: TokenPadState, inputs: dict[str, ContextParallelInput]):
        super().__init__()
        self.state, self.inputs = state, inputs
        self.indices: dict[str, int | None] = {}

    def initialize_hook(self, module):
        # resolved once here: torch.compile cannot trace inspect.signature inside the forward
        self.indices = {name: _arg_index(module, name) for name in self.inputs}
        return module

    def pre_forward(self, module, *args, **kwargs):
        args = list(args)
        for name, spec in self.inputs.items():
            index = self.indices[name]
            in_kwargs = name in kwargs
            value = kwargs.get(name) if in_kwargs else (args[index] if index is not None and index < len(args) else None)
            if not torch.is_tensor(value) or (spec.expected_dims is not None and value.ndim != spec.expected_dims):
                continue
            value = self.state.pad_tokens(value, spec.split_dim)
            if in_kwargs:
                kwargs[name] = value
            else:
                args[index] = value
        return tuple(args), kwargs


class _PadOutputsHook(ModelHook):
    """Inner post-forward hook: pads outputs (RoPE tables) before Diffusers' hook splits them."""

    def __init__(self, state: TokenPadState, outputs: dict[int, ContextParallelInput]):
        super().__init__()
        self.state, self.outputs = state, outputs

    def post_forward(self, module, output):
        single = torch.is_tensor(output)
        items = [output] if single else list(output)
        for index, spec in self.outputs.items():
            if index < len(items) and (spec.expected_dims is None or items[index].ndim == spec.expected_dims):
                items[index] = self.state.pad_tokens(items[index], spec.split_dim)
        return items[0] if single else type(output)(items)


class _StripHook(ModelHook):
    """Outer post-forward hook: cuts the padding off the gathered outputs."""

    def __init__(self, state: TokenPadState, outputs: list[ContextParallelOutput]):
        super().__init__()
        self.state, self.outputs = state, outputs

    def post_forward(self, module, output):
        if not self.state.pad:
            return output
        single = torch.is_tensor(output)
        items = [output] if single else list(output)
        for i, spec in enumerate(self.outputs):
            if spec is not None:
                items[i] = items[i].narrow(spec.gather_dim, 0, self.state.valid_len)
        return items[0] if single else type(output)(items)


class _KeyMaskHook(ModelHook):
    """Pre-forward hook on a self-attention module: passes the shard's key-padding mask as ``attention_mask``."""

    def __init__(self, state: TokenPadState):
        super().__init__()
        self.state = state

    def pre_forward(self, module, *args, **kwargs):
        if not self.state.pad:
            return args, kwargs
        hidden = args[0] if args else kwargs["hidden_states"]
        mask = self.state.mask.to(hidden.dtype)  # SDPA takes a float mask of the query's dtype
        args = list(args)
        if len(args) > 2:
            args[2] = mask
        else:
            kwargs["attention_mask"] = mask
        return tuple(args), kwargs


def _modules(model: torch.nn.Module, pattern: str) -> list[torch.nn.Module]:
    if "*" not in pattern:
        return [model.get_submodule(pattern)] if pattern else [model]
    return [m for n, m in model.named_modules() if fnmatch.fnmatchcase(n, pattern)]


def _register(module: torch.nn.Module, hook: ModelHook, name: str) -> None:
    HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, name)


def apply_token_padding(model: torch.nn.Module, plan: dict, state: TokenPadState, *, stage: str) -> None:
    """Register the padding hooks of ``plan`` on ``model``.

    ``stage="inner"`` (before Diffusers' ``apply_context_parallel``) adds the output padding of ``split_output``
    entries; ``stage="outer"`` (after it) adds the input padding and the strip after gathers.  The key masks of the
    state's self-attention layers are added while a padded token count is in use.
    """
    for module_id, spec in plan.items():
        if isinstance(spec, dict):
            outputs = {k: v for k, v in spec.items() if isinstance(v, ContextParallelInput) and v.split_output}
            inputs = {k: v for k, v in spec.items() if isinstance(v, ContextParallelInput) and not v.split_output}
            chosen = outputs if stage == "inner" else inputs
            cls = _PadOutputsHook if stage == "inner" else _PadInputsHook
            if chosen:
                for m in _modules(model, module_id):
                    _register(m, cls(state, chosen), f"{_PREFIX}_{stage}_{module_id}")
        elif stage == "outer":
            specs = [spec] if isinstance(spec, ContextParallelOutput) else list(spec)
            for m in _modules(model, module_id):
                _register(m, _StripHook(state, specs), f"{_PREFIX}_strip_{module_id}")


def remove_token_padding(model: torch.nn.Module) -> None:
    """Remove every padding hook of :func:`apply_token_padding` from ``model``."""
    for m in model.modules():
        registry = getattr(m, "_diffusers_hook", None)
        if registry is None:
            continue
        for name in [n for n in registry.hooks if n.startswith(_PREFIX)]:
            registry.remove_hook(name, recurse=False)
