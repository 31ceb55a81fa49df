"""Cutting large images into overlapping square tiles and stitching per-tile maps back together.

Pure functions over tensors, shared by training (tiles as training images) and scoring (tile
anomaly maps stitched into one map per image). A box is (y0, x0, y1, x1) in pixels, end exclusive.
"""

import torch
from torch import Tensor

Box = tuple[int, int, int, int]


def _starts(length: int, tile: int, stride: int) -> list[int]:
    """Tile starts along one axis: every `stride`, plus a last tile flush with the border."""
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] + tile < length:
        starts.append(length - tile)
    return starts


def tile_boxes(height: int, width: int, tile: int, overlap: int = 0) -> list[Box]:
    """Boxes of `tile` x `tile` tiles covering a `height` x `width` image, row by row.

    The stride is `tile - overlap`; the last tile of a row or column is moved back to end flush
    with the border, so it may overlap its neighbour by more than `overlap`. An image smaller
    than a tile is refused (no padded tiles: padding would feed the model pixels it never saw).
    """
    if tile < 1 or not 0 <= overlap < tile:
        raise ValueError(f"tile={tile}, overlap={overlap}: need tile >= 1 and 0 <= overlap < tile")
    if height < tile or width < tile:
        raise ValueError(f"image of {height}x{width} pixels is smaller than a {tile}x{tile} tile; lower the tile size")
    stride = tile - overlap
    return [(y, x, y + tile, x + tile) for y in _starts(height, tile, stride) for x in _starts(width, tile, stride)]


def extract_tiles(image: Tensor, boxes: list[Box]) -> Tensor:
    """Crops of `image` [C, H, W] at `boxes` -> [n, C, tile, tile] (all boxes the same size)."""
    return torch.stack([image[:, y0:y1, x0:x1] for y0, x0, y1, x1 in boxes])


def stitch(tile_maps: Tensor, boxes: list[Box], size: tuple[int, int]) -> Tensor:
    """Place `tile_maps` [n, tile, tile] or [n, C, tile, tile] at `boxes` in a `size` = (H, W) canvas.

    Pixels covered by several tiles get the mean of their values, so stitching the tiles of an
    image gives the image back. Returns [H, W] or [C, H, W]; every pixel must be covered.
    """
    if tile_maps.shape[0] != len(boxes):
        raise ValueError(f"{tile_maps.shape[0]} tile maps for {len(boxes)} boxes; pass one map per box")
    maps = tile_maps if tile_maps.dim() == 4 else tile_maps[:, None]  # [n, t, t] -> [n, 1, t, t]
    total = maps.new_zeros(maps.shape[1], *size)  # [C, H, W]
    count = maps.new_zeros(1, *size)  # [1, H, W]
    for tile_map, (y0, x0, y1, x1) in zip(maps, boxes):
        total[:, y0:y1, x0:x1] += tile_map
        count[:, y0:y1, x0:x1] += 1
    uncovered = int((count == 0).sum())
    if uncovered:
        raise ValueError(f"the boxes leave {uncovered} of {size[0] * size[1]} pixels uncovered; use tile_boxes(...)")
    stitched = total / count  # [C, H, W]
    return stitched if tile_maps.dim() == 4 else stitched[0]  # [1, H, W] -> [H, W]
