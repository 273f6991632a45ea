"""Collaborative selection: g_M and g_I from hooks, s = g_M * g_I, support = {s >= 0 and g_I != 0} (capped).

The algorithm as METHOD.md defines it, on top of `gradients.mean_weight_gradients` (exact mean gradients),
`scoring.collaborative_scores` (the rule) and `support.choose_support` (scores -> support). Under torch.distributed
every rank calls it on its share of the data; the gradient sums are reduced over ranks (gradients.py) and every rank
checks that all chose the same support (distributed.py).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from . import distributed
from .adapters import cpl_layers, resolve_adapter
from .gradients import mean_weight_gradients
from .losses import LossFn
from .report import ModuleSelection, SelectionReport
from .scoring import RANKINGS, collaborative_scores
from .support import choose_support


def select_collaborative(
    model: nn.Module,
    mastered: Iterable[Any],
    injection: Iterable[Any],
    *,
    loss_fn: LossFn | None = None,
    density: float | None = None,
    granularity: str | None = None,
    ranking: str = "specific",
    adapter_name: str | None = None,
    accumulate_on: str | torch.device | None = None,
    progress: bool = True,
) -> SelectionReport:
    """Choose each targeted weight's support from parameter-wise gradient contributions s = g_M * g_I.

    g_M and g_I are the exact mean gradients over the `mastered` and `injection` batches (iterables of model inputs,
    e.g. DataLoaders) at the current weights. The support is {s >= 0 and g_I != 0}: coordinates whose injection
    update does not raise the mastered loss to first order. With a `density` cap the collaborative coordinates are
    ranked by `ranking`: "specific" (default: |g_I| / (|g_M| + mean |g_M|), needed by the injection set and little
    used by the mastered one; it forgot least at a cap in the knowledge-injection benchmark), "injection" (|g_I|, the
    first-order drop of the injection loss per unit step) or "contribution" (s itself). Values restart at zero, so
    outputs are unchanged by selection.

    `density` and `granularity` default to the adapter's config, which is updated to what was used; the report is
    saved with the adapter by `save_pretrained`.

    Under torch.distributed (e.g. `accelerate launch`) call it on every rank, each with its share of the data (or
    all with all of it), before wrapping the model in DDP or sharding it with `fully_shard`: the means are over every
    rank's examples and every rank gets the same support, or an error naming the ranks that disagree.
    """
    model = distributed.unwrap(model)
    adapter_name = resolve_adapter(model, adapter_name)
    config = model.peft_config[adapter_name]
    density = config.density if density is None else density
    granularity = granularity or config.granularity
    type(config)(density=density, granularity=granularity)  # validates both, with the config's own messages
    if ranking not in RANKINGS:
        raise ValueError(f"ranking must be one of {RANKINGS}, got {ranking!r}")
    layers = cpl_layers(model, adapter_name)
    if any(distributed.is_sharded(layer.cpl_values[adapter_name]) for layer in layers.values()):
        raise ValueError("select_collaborative replaces each layer's values tensor, which fully_shard has already "
                         "sharded: select first, then call fully_shard on the model")
    _check_ranks_agree(adapter_name, config, layers, density, granularity, ranking)
    for name, data in (("mastered", mastered), ("injection", injection)):  # one rank's share may be empty
        if distributed.world_size() == 1 and hasattr(data, "__len__") and len(data) == 0:
            raise ValueError(f"the {name} data is empty: selection needs at least one {name} example")

    kwargs = dict(loss_fn=loss_fn, accumulate_on=accumulate_on, progress=progress)
    g_mastered, n_mastered = mean_weight_gradients(model, layers, mastered, description="g_M (mastered)", **kwargs)
    for name in g_mastered:  # off the accelerator while g_I accumulates: 4 bytes per targeted coordinate there
        g_mastered[name] = g_mastered[name].cpu()
    if not n_mastered:
        raise ValueError("the mastered data is empty: selection needs at least one mastered example")
    g_injection, n_injection = mean_weight_gradients(
        model, layers, injection, description="g_I (injection)", **kwargs
    )
    if not n_injection:
        raise ValueError("the injection data is empty: selection needs at least one injection example")

    if any(layer.cpl_values[adapter_name].detach().abs().sum() > 0 for layer in layers.values()):
        warnings.warn(
            f"select_collaborative replaces the support of adapter '{adapter_name}', whose values were non-zero: "
            "the trained values are discarded.",
            stacklevel=2,
        )
    report = SelectionReport(adapter_name, granularity, density, ranking, n_mastered, n_injection)
    digests = []
    for name, layer in layers.items():
        g_i = g_injection.pop(name)
        g_m = g_mastered.pop(name).to(g_i.device)
        scores, eligible = collaborative_scores(g_m, g_i, granularity, ranking, layer.output_dim)
        support = choose_support(
            scores, layer.delta_shape, eligible=eligible, density=density, granularity=granularity,
            output_dim=layer.output_dim,
        )
        layer.set_support(adapter_name, support)
        if distributed.world_size() > 1:
            digests.append((name, support.size, distributed.coordinate_digest(support.indices)))
        layer.set_mastered_sign(adapter_name, g_m.reshape(-1)[support.indices.to(g_m.device)])
        report.modules.append(_module_counts(name, g_m, g_i, support.size))
    distributed.check_same("select_collaborative's supports", {  # the same sums give the same support: check it
        "support": distributed.fingerprint(digests), "mastered examples": n_mastered,
        "injection examples": n_injection,
    })
    config.density, config.granularity = density, granularity
    config.selection_report = report
    return report


def _check_ranks_agree(adapter_name: str, config: Any, layers: dict, density: float | None, granularity: str,
                       ranking: str) -> None:
    """Under torch.distributed: every rank is here, with the same adapter, config and targeted modules."""
    distributed.check_joined("select_collaborative")
    if distributed.world_size() == 1:
        return
    settings = {key: value for key, value in config.to_dict().items() if key != "selection_report"}
    distributed.check_same("select_collaborative", {
        "adapter": adapter_name, "density": density, "granularity": granularity, "ranking": ranking,
        **{f"config.{key}": value for key, value in distributed.canonical(settings).items()},
        "targeted modules": len(layers),
        "modules": distributed.fingerprint([(name, tuple(layer.delta_shape)) for name, layer in layers.items()]),
    })


def _module_counts(name: str, g_m: torch.Tensor, g_i: torch.Tensor, support: int) -> ModuleSelection:
    contribution = g_m * g_i
    zero = int((g_i == 0).sum())
    conflicting = int((contribution < 0).sum())
    return ModuleSelection(
        name=name,
        numel=g_m.numel(),
        collaborative=g_m.numel() - zero - conflicting,
        conflicting=conflicting,
        zero_gradient=zero,
        support=support,
        contribution=float(contribution.sum()),
        mastered_sq=float(g_m.square().sum()),
        injection_sq=float(g_i.square().sum()),
    )
