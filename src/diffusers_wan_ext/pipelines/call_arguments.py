"""``forwarded``: hand a pipeline's call arguments on to the routine that does the work, in one line.

A variant's ``__call__`` shows its full signature (the public API, with its docstring), checks and loads its own
inputs, then calls a shared routine with the arguments of the same name:
:meth:`~diffusers_wan_ext.pipelines.pipeline_wan_fun_base.WanFunPipelineBase.generate`,
:meth:`~diffusers_wan_ext.pipelines.denoising.WanDenoisingMixin.denoise` or a parent ``__call__``.  Instead of
twenty ``name=name,`` lines::

    return self.generate(**forwarded(locals(), self.generate, condition_inputs={"image": first}))

:func:`forwarded` keeps the entries of ``arguments`` (the caller's ``locals()``) whose name is a keyword parameter of
``target``, then applies ``overrides``.  A name the target does not take is left out (``self``, the variant's own
inputs, scratch variables); a parameter the caller has no variable for keeps its default.  The names a target accepts
are read from :func:`inspect.signature` once per function and cached.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Mapping

__all__ = ["forwarded", "keyword_parameters"]


@functools.lru_cache(maxsize=None)
def _parameter_names(function: Callable, bound: bool) -> frozenset[str]:
    signature = inspect.signature(function)  # follows ``__wrapped__`` (``@torch.no_grad()``)
    parameters = list(signature.parameters.values())
    if bound:
        parameters = parameters[1:]  # ``self`` of a bound method
    keyword_kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return frozenset(p.name for p in parameters if p.kind in keyword_kinds)


def keyword_parameters(target: Callable) -> frozenset[str]:
    """The names ``target`` accepts as keyword arguments (a bound method's ``self`` excluded); cached per function."""
    function = getattr(target, "__func__", target)
    return _parameter_names(function, function is not target)


def forwarded(arguments: Mapping[str, Any], target: Callable, **overrides: Any) -> dict[str, Any]:
    """The keyword arguments of a call of ``target``: the entries of ``arguments`` it accepts, then ``overrides``.

    Args:
        arguments: the caller's variables, usually ``locals()`` (taken at the call, so a value the caller replaced
            before is forwarded as replaced).
        target: the function or bound method to be called (``self.generate``, ``self.denoise``,
            ``super().__call__``).
        overrides: arguments that are not the caller's variable of the same name; they replace an entry of
            ``arguments`` and are passed even when ``target`` does not name them (so a misspelt one fails loudly in
            the call).

    Example:
        >>> def target(prompt=None, height=480, width=832):
        ...     return prompt, height, width
        >>> def caller(prompt, height, width, motion=0):
        ...     return target(**forwarded(locals(), target, width=width * 2))
        >>> caller("a cat", 320, 512)
        ('a cat', 320, 1024)
    """
    names = keyword_parameters(target)
    kwargs = {name: value for name, value in arguments.items() if name in names}
    kwargs.update(overrides)
    return kwargs
