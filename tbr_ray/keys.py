"""Content keys: the one recipe for naming a cached thing by what it was computed from.

Pure (imports nothing of tbr_ray), so core and stage modules alike use it. Run
`pytest tests/test_layers.py -k content_key` for its test.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any


def content_key(obj: Any, n: int = 16, *, compact: bool = False) -> str:
    """The first n hex digits of sha256 over obj as JSON with sorted keys.

    Used by the config hash (12), the mix and reflection cache keys (16) and the tiny-model
    build key (10); their lengths and values are unchanged from before this helper.
    compact=True writes JSON without spaces after separators: the config hash was always
    written that way, and run directories are named by it, so its values are kept."""
    separators = (",", ":") if compact else None
    blob = json.dumps(obj, sort_keys=True, separators=separators)
    return hashlib.sha256(blob.encode()).hexdigest()[:n]
