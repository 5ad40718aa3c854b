"""The loss history a result carries (binned in its metadata) and the picture drawn from it."""

from __future__ import annotations

import json

from PIL import Image

from erasure.loss_curve import CURVE_KEY, binned, curve_from_metadata, curve_metadata, draw, joined_curve, png_beside


def test_binned_keeps_short_histories_and_averages_long_ones():
    assert binned([1.0, 2.0, 3.0]) == [1.0, 2.0, 3.0]
    long = [float(i) for i in range(1000)]
    b = binned(long, 10)
    assert len(b) == 10 and b[0] == sum(range(100)) / 100 and b[-1] == sum(range(900, 1000)) / 100


def test_metadata_round_trip_and_segments():
    meta = joined_curve([("cat", [3.0, 2.0]), ("dog", [5.0, 4.0, 1.0])])
    curve = curve_from_metadata(meta)
    assert curve == {"loss": [3.0, 2.0, 5.0, 4.0, 1.0], "steps": 5, "segments": [["cat", 0], ["dog", 2]]}
    assert curve_from_metadata({}) is None and curve_from_metadata({CURVE_KEY: "not json"}) is None
    assert json.loads(curve_metadata([1.0] * 600)[CURVE_KEY])["steps"] == 600  # binned, the step count kept
    assert joined_curve([("cat", [1.0])])[CURVE_KEY] == curve_metadata([1.0])[CURVE_KEY]  # one concept: no segment


def test_draw_handles_flat_single_and_non_finite_histories(tmp_path):
    for losses in ([1.0, 1.0, 1.0], [2.0], [1.0, float("nan"), 0.5], []):
        img = draw(losses, "t")
        assert isinstance(img, Image.Image) and img.size == (800, 420)
    assert png_beside(tmp_path / "erase-cat.safetensors") == tmp_path / "erase-cat.loss.png"
