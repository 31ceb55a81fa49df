import pytest
import torch

from ad_lightning.data.tiling import extract_tiles, stitch, tile_boxes


def integer_image(channels: int, height: int, width: int) -> torch.Tensor:
    return torch.randint(0, 256, (channels, height, width), generator=torch.Generator().manual_seed(0)).float()


@pytest.mark.parametrize(
    ("height", "width", "tile", "overlap"), [(1000, 1030, 256, 32), (64, 64, 64, 0), (70, 90, 32, 7)]
)
def test_boxes_cover_the_image_with_the_stride_and_a_flush_last_tile(height, width, tile, overlap):
    boxes = tile_boxes(height, width, tile, overlap)
    covered = torch.zeros(height, width, dtype=torch.int64)
    for y0, x0, y1, x1 in boxes:
        assert (y1 - y0, x1 - x0) == (tile, tile) and y0 >= 0 and x0 >= 0 and y1 <= height and x1 <= width
        covered[y0:y1, x0:x1] += 1
    assert covered.min() >= 1
    ys, xs = sorted({b[0] for b in boxes}), sorted({b[1] for b in boxes})
    assert len(boxes) == len(ys) * len(xs)
    assert ys[-1] + tile == height and xs[-1] + tile == width
    assert all(b - a == tile - overlap for a, b in zip(ys[:-2], ys[1:-1]))
    assert all(0 < b - a <= tile - overlap for a, b in zip(ys, ys[1:]))


def test_box_counts_for_known_sizes():
    assert len(tile_boxes(1024, 1024, 256, 0)) == 16
    assert len(tile_boxes(1024, 1024, 256, 32)) == 25  # starts 0, 224, 448, 672, 768
    assert len(tile_boxes(1000, 1030, 256, 32)) == 5 * 5


@pytest.mark.parametrize("channels", [1, 3])
def test_stitching_the_tiles_of_an_image_gives_it_back_exactly(channels):
    image = integer_image(channels, 1000, 1030)
    boxes = tile_boxes(1000, 1030, 256, 32)
    tiles = extract_tiles(image, boxes)
    assert tiles.shape == (len(boxes), channels, 256, 256)
    assert torch.equal(stitch(tiles, boxes, (1000, 1030)), image)
    assert torch.equal(stitch(tiles[:, 0], boxes, (1000, 1030)), image[0])


def test_overlaps_are_averaged():
    boxes = tile_boxes(4, 6, 4, 2)  # x starts 0, 2: columns 2-3 are covered twice
    maps = torch.stack([torch.zeros(4, 4), torch.full((4, 4), 2.0)])
    expected = torch.tensor([0.0, 0, 1, 1, 2, 2]).expand(4, 6)
    assert torch.equal(stitch(maps, boxes, (4, 6)), expected)


def test_stitched_map_of_256_tiles_with_overlap_is_full_size():
    boxes = tile_boxes(1024, 1024, 256, 32)
    maps = torch.rand(len(boxes), 256, 256)
    stitched = stitch(maps, boxes, (1024, 1024))
    assert stitched.shape == (1024, 1024) and torch.isfinite(stitched).all()


def test_bad_tiling_is_refused():
    with pytest.raises(ValueError, match="smaller than a 256x256 tile"):
        tile_boxes(200, 1000, 256, 0)
    with pytest.raises(ValueError, match="overlap"):
        tile_boxes(512, 512, 256, 256)
    with pytest.raises(ValueError, match="uncovered"):
        stitch(torch.zeros(1, 4, 4), [(0, 0, 4, 4)], (4, 8))
    with pytest.raises(ValueError, match="one map per box"):
        stitch(torch.zeros(2, 4, 4), [(0, 0, 4, 4)], (4, 4))
