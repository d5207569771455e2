"""Parse a layer selection ("last", "all", "0,1,2", [0, 5, -1]) into sorted layer indices."""
from __future__ import annotations

from typing import Iterable, List, Union

LayerSpec = Union[str, int, Iterable[int]]


def parse_layers(spec: LayerSpec, n_layers: int) -> List[int]:
    """Return 0-based, sorted, de-duplicated layer indices; negatives count from the end.

    Raises ValueError naming the valid range for an index outside it, as NeMo's
    `ConformerMultiLayerFeatureExtractor` does for the same input.
    """
    if n_layers < 1:
        raise ValueError(f"the encoder has no layers (n_layers={n_layers})")
    if isinstance(spec, str):
        text = spec.strip().lower()
        if text == "last":
            return [n_layers - 1]
        if text == "all":
            return list(range(n_layers))
        try:
            raw = [int(part) for part in text.split(",") if part.strip() != ""]
        except ValueError:
            raise ValueError(
                f"invalid layer selection {spec!r}: use 'last', 'all', a comma-separated list "
                f"such as '0,1,2', or a list of ints (valid indices 0..{n_layers - 1}, "
                f"or -{n_layers}..-1 from the end)"
            ) from None
    elif isinstance(spec, int):
        raw = [spec]
    else:
        raw = [int(i) for i in spec]
    if not raw:
        raise ValueError(f"empty layer selection {spec!r}: name at least one layer (0..{n_layers - 1})")
    bad = [i for i in raw if not -n_layers <= i < n_layers]
    if bad:
        raise ValueError(
            f"layer index {bad[0]} out of range for an encoder with {n_layers} layers: "
            f"valid indices are 0..{n_layers - 1} (or -{n_layers}..-1 from the end)"
        )
    return sorted({i % n_layers for i in raw})
