"""Exact resumption: the global random state travels with every checkpoint."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states

__all__ = ["ExactResume"]


class ExactResume(L.Callback):
    """Saves the global random state (torch, CUDA, numpy, Python) in every checkpoint and restores it when a run
    resumes, so a resumed run takes the same batches, augmentations and dropout masks as an uninterrupted one.

    Lightning's checkpoints hold the weights, optimizer and loop state but not the random state. It is restored when
    the checkpoint is loaded, before the resumed fit creates its training iterator (which draws its shuffle from
    it); Lightning runs the sanity check under an isolated random state. ``zoo fit`` adds this callback to every
    run. Exact equality also needs the batches to come from the main process or from workers that restart each
    epoch: with ``persistent_workers`` the workers keep their own random state, which no checkpoint holds.
    """

    def state_dict(self) -> dict[str, Any]:
        states = _collect_rng_states()
        if "numpy" in states:  # as a tensor, so the checkpoint still loads with torch.load(weights_only=True)
            kind, keys, pos, has_gauss, gauss = states["numpy"]
            states["numpy"] = [kind, torch.from_numpy(keys.copy()), pos, has_gauss, gauss]
        return {"rng_states": states}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        states = dict(state_dict.get("rng_states") or {})
        if not states:
            return
        if "numpy" in states:
            kind, keys, pos, has_gauss, gauss = states["numpy"]
            states["numpy"] = (kind, keys.numpy(), pos, has_gauss, gauss)
        _set_rng_states(states)
