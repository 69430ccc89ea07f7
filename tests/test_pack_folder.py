"""data_tools.pack_folder on image files the tests write, including broken ones."""
import io
import multiprocessing
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from data_tools import pack_folder as PF
from data_tools.pack_folder import main, pack_folder
from refimpl.data.packed import PackedDataset

S = 8


def _png16(path, a):
    """Write a 16-bit PNG by hand (Pillow cannot write 16-bit RGB): a uint16 (H, W) or (H, W, 3)."""
    h, w = a.shape[:2]
    color_type = 0 if a.ndim == 2 else 2
    rows = a.reshape(h, -1).astype(">u2")
    raw = b"".join(b"\x00" + rows[i].tobytes() for i in range(h))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n"
                     + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _solid(color, mode="RGB", size=(S, S)):
    return Image.new(mode, size, color)


def _make_good(folder):
    """Write one image of each kind into ``folder``; return {name: expected pixel (0, 0)}."""
    folder.mkdir(parents=True, exist_ok=True)
    expect = {}
    _solid((10, 20, 30)).save(folder / "rgb.png")
    expect["rgb.png"] = (10, 20, 30)
    _solid(100, "L").save(folder / "gray.png")
    expect["gray.png"] = (100, 100, 100)
    g16 = np.full((S, S), 65535, np.uint16)
    g16[0, 0], g16[0, 1], g16[0, 2], g16[0, 3] = 32768, 256, 255, 0
    Image.fromarray(g16).save(folder / "gray16.png")  # Pillow mode I;16
    expect["gray16.png"] = (128, 128, 128)
    c16 = np.zeros((S, S, 3), np.uint16)
    c16[0, 0] = (65535, 32768, 256)
    _png16(folder / "rgb16.png", c16)
    expect["rgb16.png"] = (255, 128, 1)
    rgba = np.zeros((S, S, 4), np.uint8)
    rgba[...] = (0, 0, 255, 255)
    rgba[0, 0] = (255, 0, 0, 0)  # fully transparent red -> white
    Image.fromarray(rgba, "RGBA").save(folder / "rgba.png")
    expect["rgba.png"] = (255, 255, 255)
    la = Image.new("LA", (S, S), (0, 255))
    la.putpixel((0, 0), (0, 0))
    la.save(folder / "la.png")
    expect["la.png"] = (255, 255, 255)
    pal = Image.new("P", (S, S), 1)
    pal.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    pal.putpixel((0, 0), 0)
    pal.save(folder / "palette.png", transparency=0)  # index 0 (red) is transparent -> white
    expect["palette.png"] = (255, 255, 255)
    _solid((0, 255, 255, 0), "CMYK").save(folder / "cmyk.jpg", quality=100)  # red
    expect["cmyk.jpg"] = (255, 0, 0)  # within JPEG error
    marker = Image.new("RGB", (S, S), (0, 0, 0))
    marker.putpixel((0, 0), (255, 255, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    marker.save(folder / "exif.png", exif=exif)
    expect["exif.png"] = (0, 0, 0)  # the marker moved to the top-right corner
    return expect


def _make_bad(folder):
    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
        buf, "JPEG")
    (folder / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.png").write_text("this is not an image\n")
    return {"truncated.jpg": "corrupt or truncated", "empty.jpg": "zero-byte",
            "notes.png": "not an image"}


def _pixel(ds, name):
    return tuple(int(v) for v in ds.read([ds.manifest["files"].index(name)])[0, 0, 0])


def test_imagefolder_layout_and_conversions(tmp_path):
    expect = _make_good(tmp_path / "src" / "b_class")
    (tmp_path / "src" / "a_class" / "sub").mkdir(parents=True)
    _solid((1, 2, 3)).save(tmp_path / "src" / "a_class" / "x.png")
    _solid((4, 5, 6)).save(tmp_path / "src" / "a_class" / "sub" / "y.png")
    (tmp_path / "src" / ".hidden").mkdir()  # ignored
    assert main([str(tmp_path / "src"), str(tmp_path / "out"), "--size", str(S), "--workers", "1",
                 "--quiet"]) == 0
    ds = PackedDataset(tmp_path / "out")
    assert ds.class_names == ["a_class", "b_class"]
    files = ds.manifest["files"]
    assert files[:2] == ["a_class/sub/y.png", "a_class/x.png"]  # sorted relative paths
    assert files[2:] == sorted(f"b_class/{n}" for n in expect)
    np.testing.assert_array_equal(ds.labels, [0, 0] + [1] * len(expect))
    assert ds.manifest["source"]["layout"] == "imagefolder" and ds.manifest["skipped"] == []
    assert ds.images.shape == (2 + len(expect), S, S, 3)
    assert _pixel(ds, "a_class/x.png") == (1, 2, 3)
    for name, rgb in expect.items():
        got = _pixel(ds, f"b_class/{name}")
        tol = 6 if name.endswith(".jpg") else 0
        assert np.abs(np.subtract(got, rgb)).max() <= tol, (name, got, rgb)
    # 16-bit gray: v >> 8 at the other marked pixels, never clipped
    g = ds.read([files.index("b_class/gray16.png")])[0, 0, :4, 0]
    assert g.tolist() == [128, 1, 0, 0]
    assert ds.read([files.index("b_class/gray16.png")])[0, 1, 1].tolist() == [255] * 3
    # the rest of the RGBA / palette images kept their colour
    assert ds.read([files.index("b_class/rgba.png")])[0, 1, 1].tolist() == [0, 0, 255]
    assert ds.read([files.index("b_class/palette.png")])[0, 1, 1].tolist() == [0, 255, 0]
    assert ds.read([files.index("b_class/la.png")])[0, 1, 1].tolist() == [0, 0, 0]
    ex = ds.read([files.index("b_class/exif.png")])[0]
    assert ex[0, S - 1].tolist() == [255, 255, 255] and ex.sum() == 3 * 255  # rotated


def test_flat_layout(tmp_path):
    (tmp_path / "src").mkdir()
    for i in range(3):
        _solid((i, i, i)).save(tmp_path / "src" / f"{i}.png")
    (tmp_path / "src" / ".DS_Store").write_bytes(b"junk")  # hidden: ignored
    out = pack_folder(tmp_path / "src", tmp_path / "out", S, workers=1, progress=False)
    ds = PackedDataset(out)
    assert ds.class_names == [] and ds.labels.tolist() == [-1, -1, -1]
    assert ds.manifest["files"] == ["0.png", "1.png", "2.png"]
    assert ds.manifest["source"]["layout"] == "flat"
    assert [int(ds.read([i])[0, 0, 0, 0]) for i in range(3)] == [0, 1, 2]


def test_resize_modes(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    a = np.zeros((8, 16, 3), np.uint8)  # H=8, W=16
    a[:, :, 0] = np.arange(16)[None, :] * 10
    Image.fromarray(a).save(src / "wide.png")
    ds = PackedDataset(pack_folder(src, tmp_path / "short", 8, workers=1, progress=False))
    np.testing.assert_array_equal(ds.read([0])[0], a[:, 4:12])  # no scaling; center crop
    ds = PackedDataset(pack_folder(src, tmp_path / "exact", 8, resize="exact", workers=1,
                                   progress=False))
    ref = np.asarray(Image.fromarray(a).resize((8, 8), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(ds.read([0])[0], ref)
    ds = PackedDataset(pack_folder(src, tmp_path / "small", 4, workers=1, progress=False))
    ref = np.asarray(Image.fromarray(a).resize((8, 4), Image.Resampling.BICUBIC))[:, 2:6]
    np.testing.assert_array_equal(ds.read([0])[0], ref)


def test_bad_files_fail_by_default_and_write_nothing(tmp_path, capsys):
    _make_good(tmp_path / "src")
    bad = _make_bad(tmp_path / "src")
    assert main([str(tmp_path / "src"), str(tmp_path / "out"), "--size", str(S), "--workers", "1",
                 "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "3 of 12 files" in err
    for name, reason in bad.items():
        assert f"{name}: {reason}" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no output, no temp folder


def test_skip_bad_records_the_skipped(tmp_path):
    good = _make_good(tmp_path / "src")
    bad = _make_bad(tmp_path / "src")
    assert main([str(tmp_path / "src"), str(tmp_path / "out"), "--size", str(S), "--workers", "1",
                 "--skip-bad", "--quiet"]) == 0
    ds = PackedDataset(tmp_path / "out")
    assert len(ds) == len(good) and sorted(ds.manifest["files"]) == sorted(good)
    skipped = {s["path"]: s["reason"] for s in ds.manifest["skipped"]}
    assert sorted(skipped) == sorted(bad)
    for name, reason in bad.items():
        assert skipped[name].startswith(reason)
    assert ds.verify()


def test_one_and_two_workers_give_identical_output(tmp_path):
    src = tmp_path / "src"
    rng = np.random.default_rng(1)
    for c in ("x", "y"):
        (src / c).mkdir(parents=True)
        for i in range(12):
            h, w = rng.integers(6, 20, 2)
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(src / c / f"{i:02d}.png")
    _make_bad(src / "y")
    one = PackedDataset(pack_folder(src, tmp_path / "one", S, workers=1, skip_bad=True, progress=False))
    two = PackedDataset(pack_folder(src, tmp_path / "two", S, workers=2, skip_bad=True, progress=False))
    np.testing.assert_array_equal(one.images, two.images)
    np.testing.assert_array_equal(one.labels, two.labels)
    for key in ("files", "skipped", "checksums", "class_names"):
        assert one.manifest[key] == two.manifest[key]
    assert len(one) == 24 and len(one.manifest["skipped"]) == 3


def test_input_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        pack_folder(tmp_path / "empty", tmp_path / "o", S, progress=False)
    (tmp_path / "hidden_only").mkdir()
    (tmp_path / "hidden_only" / ".x.png").write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        pack_folder(tmp_path / "hidden_only", tmp_path / "o", S, progress=False)
    (tmp_path / "emptyclass" / "a").mkdir(parents=True)
    (tmp_path / "emptyclass" / "b").mkdir()
    _solid((0, 0, 0)).save(tmp_path / "emptyclass" / "a" / "1.png")
    with pytest.raises(ValueError, match="holds no files"):
        pack_folder(tmp_path / "emptyclass", tmp_path / "o", S, progress=False)
    (tmp_path / "mixed" / "a").mkdir(parents=True)
    _solid((0, 0, 0)).save(tmp_path / "mixed" / "a" / "1.png")
    _solid((0, 0, 0)).save(tmp_path / "mixed" / "2.png")
    with pytest.raises(ValueError, match="mixes files"):
        pack_folder(tmp_path / "mixed", tmp_path / "o", S, progress=False)
    with pytest.raises(FileNotFoundError):
        pack_folder(tmp_path / "missing", tmp_path / "o", S, progress=False)
    with pytest.raises(ValueError, match="must not be SRC or inside it"):
        pack_folder(tmp_path / "mixed", tmp_path / "mixed" / "out", S, progress=False)
    # all files bad, even with --skip-bad: nothing to write
    _make_bad(tmp_path / "allbad")
    with pytest.raises(ValueError, match="none of the 3 files"):
        pack_folder(tmp_path / "allbad", tmp_path / "o", S, skip_bad=True, workers=1, progress=False)
    assert not (tmp_path / "o").exists()
    # an existing OUT is an error unless --overwrite
    pack_folder(tmp_path / "emptyclass" / "a", tmp_path / "o", S, workers=1, progress=False)
    with pytest.raises(FileExistsError, match="already exists"):
        pack_folder(tmp_path / "emptyclass" / "a", tmp_path / "o", S, workers=1, progress=False)
    pack_folder(tmp_path / "emptyclass" / "a", tmp_path / "o", S, workers=1, progress=False,
                overwrite=True)


def test_decompression_bomb_limit(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    _solid((9, 9, 9), size=(10, 10)).save(src / "ok.png")  # 100 pixels: at the limit
    _solid((9, 9, 9), size=(12, 12)).save(src / "warn.png")  # 144 > 100: Pillow only warns
    _solid((9, 9, 9), size=(20, 20)).save(src / "error.png")  # 400 > 2 x 100: Pillow raises
    before = Image.MAX_IMAGE_PIXELS
    assert main([str(src), str(tmp_path / "out"), "--size", "4", "--max-pixels", "100",
                 "--workers", "1", "--skip-bad", "--quiet"]) == 0
    assert Image.MAX_IMAGE_PIXELS == before  # the global limit is restored
    ds = PackedDataset(tmp_path / "out")
    assert ds.manifest["files"] == ["ok.png"]
    skipped = {s["path"]: s["reason"] for s in ds.manifest["skipped"]}
    assert sorted(skipped) == ["error.png", "warn.png"]
    assert all(r.startswith("decompression bomb") for r in skipped.values())
    # the same limit in worker processes
    assert main([str(src), str(tmp_path / "out2"), "--size", "4", "--max-pixels", "100",
                 "--workers", "2", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "warn.png: decompression bomb" in err and "error.png: decompression bomb" in err


def test_command_line_runs_as_a_module(tmp_path):
    (tmp_path / "src").mkdir()
    _solid((7, 8, 9)).save(tmp_path / "src" / "a.png")
    r = subprocess.run([sys.executable, "-m", "data_tools.pack_folder", str(tmp_path / "src"),
                        str(tmp_path / "out"), "--size", "4"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "1/1 images" in r.stderr  # the progress line
    assert PackedDataset(tmp_path / "out").read([0])[0, 0, 0].tolist() == [7, 8, 9]



def test_symlinked_folders_are_followed_and_loops_skipped(tmp_path, capsys):
    src = tmp_path / "src"
    (src / "a" / "sub").mkdir(parents=True)
    (src / "b").mkdir()
    (tmp_path / "elsewhere").mkdir()
    _solid((1, 1, 1)).save(src / "a" / "x.png")
    _solid((2, 2, 2)).save(src / "a" / "sub" / "y.png")
    _solid((3, 3, 3)).save(src / "b" / "u.png")
    _solid((4, 4, 4)).save(tmp_path / "elsewhere" / "z.png")
    os.symlink(tmp_path / "elsewhere", src / "a" / "linked")  # a folder outside SRC: followed
    os.symlink("..", src / "a" / "sub" / "back")               # -> a: a loop
    os.symlink("../..", src / "b" / "up")                      # -> above SRC: a loop
    os.symlink(".", src / "b" / "here")                        # -> b itself: a loop
    os.symlink("nowhere.png", src / "b" / "broken.png")        # a broken link: a bad file
    assert main([str(src), str(tmp_path / "out"), "--size", "4", "--workers", "1", "--skip-bad",
                 "--quiet"]) == 0
    ds = PackedDataset(tmp_path / "out")
    assert ds.manifest["files"] == ["a/linked/z.png", "a/sub/y.png", "a/x.png", "b/u.png"]
    assert ds.labels.tolist() == [0, 0, 0, 1]
    assert ds.read([0])[0, 0, 0].tolist() == [4, 4, 4]  # the image behind the link
    skipped = {s["path"]: s["reason"] for s in ds.manifest["skipped"]}
    assert skipped == {
        "a/sub/back": "symbolic link loop: leads back to a, which it lies in; not followed",
        "b/here": "symbolic link loop: leads back to b, which it lies in; not followed",
        "b/up": f"symbolic link loop: leads back to {tmp_path.resolve()} (above SRC), which it "
                f"lies in; not followed",
        "b/broken.png": "broken symbolic link (to nowhere.png)"}
    err = capsys.readouterr().err
    assert "pack_folder: note: did not follow 3 symbolic link loop(s)" in err
    # a top-level link back to SRC is no class
    os.symlink(".", src / "all")
    layout, classes, rels, _, loops = PF.find_images(src)
    assert classes == ["a", "b"] and [s["path"] for s in loops][0] == "all"
    assert loops[0]["reason"] == "symbolic link loop: leads back to SRC, which it lies in; not followed"


def test_workers_are_clamped_to_the_cpus(tmp_path, monkeypatch, capsys):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(6):
        _solid((i, i, i)).save(src / f"{i}.png")
    started = []

    class Recorder(PF.ProcessPoolExecutor):
        def __init__(self, max_workers, **kwargs):
            started.append(max_workers)
            super().__init__(max_workers, **kwargs)
    monkeypatch.setattr(PF, "ProcessPoolExecutor", Recorder)
    monkeypatch.setattr(PF, "available_cpus", lambda: 2)
    assert main([str(src), str(tmp_path / "out"), "--size", "4", "--workers", "100000",
                 "--quiet"]) == 0
    assert started == [2]  # two processes, not 100000
    assert capsys.readouterr().err == ("pack_folder: note: --workers 100000 is more than the 2 CPUs "
                                       "this process may use; using 2\n")
    assert [int(v) for v in PackedDataset(tmp_path / "out").images[:, 0, 0, 0]] == list(range(6))
    # and never more workers than files: for one file, no pool at all
    monkeypatch.setattr(PF, "available_cpus", lambda: 64)
    (tmp_path / "single").mkdir()
    _solid((9, 9, 9)).save(tmp_path / "single" / "a.png")
    pack_folder(tmp_path / "single", tmp_path / "one", 4, workers=8, progress=False)
    assert started == [2]
    assert capsys.readouterr().err == ""


def test_out_of_memory_is_not_reported_as_corrupt(tmp_path, monkeypatch, capsys):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("a.png", "c.png"):
        _solid((5, 5, 5)).save(src / name)
    _solid((5, 5, 5), size=(S + 1, S + 1)).save(src / "big.png")
    real = PF.resize_square

    def resize(im, size, resize="shorter"):
        if im.size == (S + 1, S + 1):
            raise MemoryError()  # as Pillow and NumPy raise when an allocation fails
        return real(im, size, resize)
    monkeypatch.setattr(PF, "resize_square", resize)
    assert PF.decode_image(str(src / "a.png"), 4)[0] == PF.OK
    assert PF.decode_image(str(src / "big.png"), 4) == (
        PF.OUT_OF_MEMORY, "out of memory decoding it (MemoryError)")
    # even with --skip-bad: the run stops, names the file, and writes nothing
    assert main([str(src), str(tmp_path / "out"), "--size", "4", "--workers", "1", "--skip-bad",
                 "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("pack_folder: error: out of memory decoding 1 of 3 files under ")
    assert "big.png: out of memory decoding it (MemoryError)" in err and "corrupt" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def _die_on_b(task):
    """A decoding task whose worker process dies on b.png (as under the OOM killer)."""
    if task[0].endswith("b.png"):
        os._exit(9)
    return PF.decode_image(*task)


@pytest.mark.skipif(multiprocessing.get_start_method() != "fork",
                    reason="the patched task reaches the workers only by fork")
def test_a_dying_worker_is_an_error_not_a_hang(tmp_path, monkeypatch, capsys):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("a.png", "b.png", "c.png"):
        _solid((5, 5, 5)).save(src / name)
    monkeypatch.setattr(PF, "_decode_task", _die_on_b)
    monkeypatch.setattr(PF, "available_cpus", lambda: 2)
    assert main([str(src), str(tmp_path / "out"), "--size", "4", "--workers", "2", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("pack_folder: error: out of memory decoding the files under ")
    assert "a decoding worker process died abruptly" in err and "--workers 1" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_too_large_size_is_one_clear_error(tmp_path):
    (tmp_path / "src").mkdir()
    _solid((7, 8, 9)).save(tmp_path / "src" / "a.png")
    size = "99999999999999999999"
    r = subprocess.run([sys.executable, "-m", "data_tools.pack_folder", str(tmp_path / "src"),
                        str(tmp_path / "out"), "--size", size], capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr.startswith(f"pack_folder: error: --size {size}: decoding into {size}x{size} "
                               f"images with 1 worker(s) needs about ")
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
