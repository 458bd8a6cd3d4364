"""Every sampler by name: ``sample(name, ...)`` runs the one registered in ``SAMPLERS`` under
``name`` (``TreeSpec.sampler``): IBTree and independent sampling (``sampling``), TreeRL's EPTree
(``eptree``), TreePO's segment tree (``treepo``). Importing this module registers them all.
"""
from __future__ import annotations

from ibtpo_core.algo import eptree, treepo  # noqa: F401  (they register themselves)
from ibtpo_core.algo.sampling import SAMPLERS, SampleResult


def sample(name: str, *args, **kwargs) -> SampleResult:
    return SAMPLERS.get(name)(*args, **kwargs)
