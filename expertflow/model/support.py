"""Families whose experts ExpertFlow cannot run in place yet, with the reason: an explicit table, checked
before any work, so ``expertflow inspect`` and ``load_model`` say so precisely.

Every entry is a family the sweep over transformers' MoE families (``tests/test_families.py``) finds
failing without it; the sweep also checks that each entry is still needed.
"""

from __future__ import annotations

from expertflow.errors import UnsupportedModelError

#: model_type -> why its experts cannot be offloaded.
UNSUPPORTED: dict[str, str] = {}


def check_supported(model_type: str, *, file: str | None = None) -> None:
    """Raise :class:`UnsupportedModelError` with the reason when ``model_type`` is in :data:`UNSUPPORTED`."""
    reason = UNSUPPORTED.get(model_type)
    if reason is not None:
        raise UnsupportedModelError(f"{model_type} is not supported: {reason}", file=file)
