"""Preview contact sheet: a PNG of the expected size, clear error for a missing dataset."""
import numpy as np

from data_tools import preview as P


def test_preview_synthetic_png_dimensions(tmp_path):
    from PIL import Image
    out = tmp_path / "grid.png"
    assert P.main(["synthetic:n=100,size=16,classes=8", "--out", str(out), "--n", "3",
                   "--augs", "4"]) == 0
    im = np.asarray(Image.open(out))
    g = P.GAP
    assert im.shape == (3 * 16 + 4 * g, 5 * 16 + 7 * g, 3)
    # gaps are gray, and the original column equals the eval-transformed image
    assert (im[:g] == P.GAP_VALUE).all()
    from refimpl.data.synthetic import open_synthetic
    ds = open_synthetic("synthetic:n=100,size=16,classes=8")
    np.testing.assert_array_equal(im[g:g + 16, g:g + 16], ds.read([0])[0])
    # augmentations differ from the original
    assert not np.array_equal(im[g:g + 16, 3 * g + 16:3 * g + 32], ds.read([0])[0])


def test_preview_packed_with_size_and_zoom(tmp_path):
    from PIL import Image
    from refimpl.data.packed import write_packed
    rng = np.random.default_rng(0)
    data = write_packed(tmp_path / "d", rng.integers(0, 256, (5, 12, 12, 3), dtype=np.uint8),
                        np.arange(5))
    out = tmp_path / "g.png"
    assert P.main([str(data), "--out", str(out), "--n", "2", "--augs", "1", "--size", "20",
                   "--zoom", "2"]) == 0
    g = P.GAP
    assert np.asarray(Image.open(out)).shape == (2 * (2 * 20 + 3 * g), 2 * (2 * 20 + 4 * g), 3)


def test_preview_missing_dataset(tmp_path, capsys):
    out = tmp_path / "x.png"
    assert P.main([str(tmp_path / "nope"), "--out", str(out)]) == 1
    assert "not found" in capsys.readouterr().err
    assert not out.exists()
    assert P.main(["synthetic:n=3,bogus=1", "--out", str(out)]) == 1
    assert "unknown key" in capsys.readouterr().err
