"""Bottom-up region proposals for R-CNN and Fast R-CNN: selective search, a proposal store, recall.

``from proposals import selective_search`` is the entry point; see :mod:`proposals.selective_search`.
"""

from proposals.selective_search import MODES, Strategy, selective_search, strategies

__all__ = ["MODES", "Strategy", "selective_search", "strategies"]
