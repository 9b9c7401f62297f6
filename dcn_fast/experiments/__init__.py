"""The paper's experiments beyond Table 1, one command each (``dcn-fast experiment NAME``).

=================  ============================================================
``small-data``     Table 2: accuracy of models trained on n images per class
``reconstruction`` Table 3, A.4: a decoder on a frozen classifier's features
``completion``     Fig. 3c, 4, A.2, A.3: a masked centre patch, accuracy and D(t)
``contrast``       Fig. 5: accuracy and NFE under input contrast c·x
``scales``         Fig. 3a, 3b: the learned σ of a trained DCN
=================  ============================================================

Each writes ``result.json`` and PNG figures under ``--out``; ``--quick`` runs it
on the shipped sample in about a minute (:mod:`.common`).
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["EXPERIMENTS", "load"]

#: Command name → module of this package.
EXPERIMENTS = {
    "small-data": "small_data",
    "reconstruction": "reconstruction",
    "completion": "completion",
    "contrast": "contrast",
    "scales": "scales",
}


def load(name: str) -> ModuleType:
    """The module of experiment ``name`` (``HELP``, ``add_arguments``, ``run``)."""
    return importlib.import_module(f".{EXPERIMENTS[name]}", __name__)
