"""The registered ``kvtrain`` attention function, and the one mechanism by which it finds what to do: the *route*
bound to the attention module it is called with.

transformers calls an attention function after RoPE and after `past_key_values.update`, with the attention module
(which carries `layer_idx`) but not with the cache. So whatever takes over a module's attention binds itself to
that module as its route (the attribute named by `ROUTE_ATTRIBUTE`), and the attention function hands the call to
that route; a module without a route gets plain SDPA (e.g. the full-cache teacher). A route is called as
``route(module, query, key, value, attention_mask, scaling, position_ids)``. There are three kinds of route:

* a `CompressedCache` layer binds itself in `update`, for the one attention call that follows, and unbinds when
  called (restoring whatever route it displaced);
* `replay_compression` binds a `Replay` for a ``with`` block. The binding lives on the module, not on the
  thread, because gradient checkpointing recomputes the forward during backward (on CUDA, in autograd's
  device thread) and that recomputation must attend exactly as the forward did;
* `observe_attention` binds an `Observer` in front of the route it finds, for a ``with`` block: it sees (and
  may replace) every call's post-RoPE queries, keys and values, then hands over to that route. That is how
  calibration collects statistics without hooks on modules. Routes bound later go beneath the observers, so
  an observer sees every call of its block, whatever else is bound inside it.

The function must also be registered as a mask function, otherwise transformers hands it ``attention_mask=None``.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator

import torch
from torch import Tensor
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTENTION_NAME = "kvtrain"
ROUTE_ATTRIBUTE = "kvtrain_route"


class Route(ABC):
    """What attends for an attention module in place of plain SDPA."""

    @abstractmethod
    def __call__(self, module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                 scaling: float, position_ids: Tensor | None) -> Tensor:
        """Attention output ``[b, h_q, q, d_v]`` for query ``[b, h_q, q, d]`` and key, value ``[b, h_kv, kv, d]``
        (post-RoPE, KV heads not repeated, as transformers passes them)."""


def route_of(module) -> Route | None:
    return module.__dict__.get(ROUTE_ATTRIBUTE)


def bind_route(module, route: Route | None) -> Route | None:
    """Make `route` the module's route (None: plain SDPA), beneath any observers bound to it, which keep seeing
    every call; returns the route it replaces (to restore with `restore_route`)."""
    previous = route_of(module)
    module.__dict__[ROUTE_ATTRIBUTE] = _beneath_observers(previous, route)
    return previous


def restore_route(module, previous: Route | None) -> None:
    module.__dict__[ROUTE_ATTRIBUTE] = previous


@contextlib.contextmanager
def routed(model, route: Route | None) -> Iterator[None]:
    """Within this block, every attention module of `model` attends through `route` (None: plain SDPA)."""
    modules = attention_modules(model)
    previous = [bind_route(m, route) for m in modules]
    try:
        yield
    finally:
        for m, before in zip(modules, previous):
            restore_route(m, before)


def attention_modules(model) -> list[torch.nn.Module]:
    """The modules the attention function is called with: those carrying `layer_idx` and `scaling`."""
    modules = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "scaling")]
    if not modules:
        raise ValueError(f"{type(model).__name__}: found no attention module (with layer_idx and scaling)")
    return modules


def plain_attention(module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                    scaling: float, dropout: float = 0.0, **kwargs) -> Tensor:
    """transformers' SDPA attention, ``[b, h_q, q, d_v]``."""
    out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                    **kwargs)
    return out.transpose(1, 2)


# callback(module, query [b,h_q,q,d], key [b,h_kv,kv,d], value, attention_mask) for every attention call;
# it returns None, or a (key, value) pair that replaces the inputs (e.g. to measure a perturbation).
ObserverFn = Callable[..., "tuple[Tensor, Tensor] | None"]


class Observer(Route):
    """A route that shows each call to `observer` before handing it to the route it was bound over."""

    def __init__(self, observer: ObserverFn, inner: Route | None):
        self.observer = observer
        self.inner = inner

    def __call__(self, module, query, key, value, attention_mask, scaling, position_ids):
        replaced = self.observer(module, query, key, value, attention_mask)
        if replaced is not None:
            key, value = replaced
        if self.inner is None:
            return plain_attention(module, query, key, value, attention_mask, scaling)
        return self.inner(module, query, key, value, attention_mask, scaling, position_ids)


def _beneath_observers(current: Route | None, route: Route | None) -> Route | None:
    """`route` in place of whatever the observers of `current` (if any) hand over to."""
    if isinstance(current, Observer):
        return Observer(current.observer, _beneath_observers(current.inner, route))
    return route


@contextlib.contextmanager
def observe_attention(model, observer: ObserverFn) -> Iterator[None]:
    """Within this block, `observer` sees (and may replace) the inputs of every attention call (post-RoPE)."""
    use_kvtrain_attention(model)
    modules = attention_modules(model)
    previous = [route_of(m) for m in modules]
    for m, before in zip(modules, previous):
        restore_route(m, Observer(observer, before))
    try:
        yield
    finally:
        for m, before in zip(modules, previous):
            restore_route(m, before)


def kvtrain_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    scaling = module.scaling if scaling is None else scaling
    route = route_of(module)
    if route is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    if dropout:
        # transformers passes the module's attention_dropout in training mode; no route applies it.
        raise ValueError(f"layer {module.layer_idx}: attention dropout {dropout} (config.attention_dropout) is not "
                         "supported by kvtrain's compressed cache and replay; set attention_dropout to 0")
    # transformers passes the forward's RoPE positions along; SALS un-rotates queries and keys with them.
    out = route(module, query, key, value, attention_mask, scaling, kwargs.get("position_ids"))
    return out.transpose(1, 2), None


def register() -> None:
    AttentionInterface.register(ATTENTION_NAME, kvtrain_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def use_kvtrain_attention(model) -> None:
    """Route the model's attention through kvtrain (idempotent)."""
    register()
    if getattr(model.config, "_attn_implementation", None) != ATTENTION_NAME:
        model.set_attn_implementation(ATTENTION_NAME)
