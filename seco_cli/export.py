"""VOC-palette PNG export of a complete mask store, for users who train or inspect with other
tools. The folder carries the ``.seco-output`` marker, so a re-run replaces it and a user's
folder is never overwritten."""

from __future__ import annotations

from pathlib import Path

from seco_cli.data.images import save_png, voc_palette
from seco_cli.store import StoreReader, fresh_output_dir


def export_pngs(store: Path, png_dir: Path, group: str | None = None, enabled: bool = True) -> int:
    """Every mask of ``store`` (its root or ``group``) as ``<id>.png`` in a fresh ``png_dir``;
    with ``enabled`` false the folder is made empty (DVC declares it). Returns the count."""
    out = fresh_output_dir(png_dir)
    if not enabled:
        return 0
    reader = StoreReader(store)
    palette = voc_palette()
    for image_id, mask in reader.items(group):
        save_png(out / f"{image_id}.png", mask, palette)
    return len(reader.ids(group))
