"""The expert library over the MLflow registry, one concern per module:

- :mod:`factory.library.registry`: :class:`ExpertLibrary` (registration exactly once,
  promotion, rollback, prices, browsing, download and export) and :class:`LibraryVersion`;
- :mod:`factory.library.promotion`: the promotion gate (:func:`promotion_gate` over
  :class:`GateInputs`), which alone makes a version ``champion``; distinct from the candidate
  gate of :mod:`evaluation.gate`;
- :mod:`factory.library.provenance`: the provenance schema (:class:`RegistrationProvenance`)
  and the version tags a registration writes;
- :mod:`factory.library.claims`: the claim table that makes registration exactly-once across
  machines.

Weight bundles are written by :mod:`factory.bundle`.
"""

from factory.library.promotion import GATE_REASONS, GateInputs, PromotionDecision, promotion_gate
from factory.library.provenance import PROVENANCE_TAGS, RegistrationProvenance, code_version
from factory.library.registry import CHALLENGER, CHAMPION, ExpertLibrary, LibraryVersion

__all__ = [
    "CHALLENGER",
    "CHAMPION",
    "GATE_REASONS",
    "PROVENANCE_TAGS",
    "ExpertLibrary",
    "GateInputs",
    "LibraryVersion",
    "PromotionDecision",
    "RegistrationProvenance",
    "code_version",
    "promotion_gate",
]
