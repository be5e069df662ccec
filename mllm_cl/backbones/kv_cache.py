"""Which keyword a transformers model's ``forward`` takes its KV cache under.

transformers renamed the argument: releases up to the early 5.x take
``past_key_values``; later ones take ``cache`` and keep the old name working
behind a ``FutureWarning`` (``past_key_values is deprecated ... Use cache
instead``), which would print on every evaluation batch. ``pyproject.toml``
allows transformers >= 4.56, so the name is read from the signature of the
model being called rather than from a version number: whatever the installed
release expects is what it gets.

The backbones of ``mllm_cl.backbones`` take the cache as ``cache`` (and, for
callers written against older code, ``past_key_values``) and hand it on under
the name their language model expects.
"""

from __future__ import annotations

import inspect
from functools import cache
from typing import Any

NEW, OLD = "cache", "past_key_values"


@cache
def _keyword(cls: type) -> str:
    params = inspect.signature(cls.forward).parameters  # follows functools.wraps of transformers' decorators
    return NEW if NEW in params else OLD


def cache_keyword(model) -> str:
    """``"cache"`` if ``model.forward`` names that parameter, else ``"past_key_values"``."""
    return _keyword(type(model))


def take_cache(kwargs: dict[str, Any]) -> Any:
    """Remove the cache from ``kwargs`` under either name and return it (``None`` when absent)."""
    new, old = kwargs.pop(NEW, None), kwargs.pop(OLD, None)
    if new is not None and old is not None:
        raise ValueError(f"give the KV cache once, as `{NEW}` (or `{OLD}`), not both")
    return new if new is not None else old


def cache_kwargs(model, cache: Any) -> dict[str, Any]:
    """``{name: cache}`` under the name ``model.forward`` takes; empty when there is no cache."""
    return {} if cache is None else {cache_keyword(model): cache}
