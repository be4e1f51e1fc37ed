"""Dataset layer: KMNIST and HIGGS loaders, downloads, checks, splits, augmentation.

Small files in each official layout are written into ``tmp_path``; the network
is never used (``fetch_url`` is replaced for every test). The real files under
../shared/data are used where present (``shared_data``).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import re
from pathlib import Path

import numpy
import pytest

from cupynn import to_numpy
from cupynn.data import (Dataset, DownloadError, RandomAffine, affine_transform, download,
                         download_file, find_higgs, higgs, kmnist, load_digits, load_higgs,
                         load_kmnist, read_higgs_csv, stratified_split)
from cupynn.data.download import checksum_problem
from cupynn.data.kmnist import LAYOUTS, OfficialFile

from conftest import shared_data

NPZ_NAMES = {(split, kind): LAYOUTS["npz"][(split, kind)].name
             for split in ("train", "test") for kind in ("images", "labels")}
IDX_NAMES = {(split, kind): LAYOUTS["idx"][(split, kind)].name
             for split in ("train", "test") for kind in ("images", "labels")}


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Every test runs offline: a download attempt fails as it does without a network."""
    def offline(url, out, **kwargs):
        raise OSError(f"no network in tests ({url})")

    monkeypatch.setattr(download, "fetch_url", offline)


def serve(monkeypatch, files: dict[str, bytes]) -> list[str]:
    """Replace the network by ``files`` (URL basename -> bytes); return the list of URLs fetched."""
    fetched = []

    def fake_fetch(url, out, **kwargs):
        fetched.append(url)
        name = url.rsplit("/", 1)[-1]
        if name not in files:
            raise OSError(f"404 for {url}")
        out.write(files[name])

    monkeypatch.setattr(download, "fetch_url", fake_fetch)
    return fetched


# -- KMNIST files in both layouts -------------------------------------------------------------

def make_kmnist(n: int, seed: int = 0) -> tuple[numpy.ndarray, numpy.ndarray]:
    rng = numpy.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=numpy.uint8)
    labels = (numpy.arange(n) % 10).astype(numpy.uint8)
    rng.shuffle(labels)
    return images, labels


def npz_bytes(array: numpy.ndarray) -> bytes:
    buffer = io.BytesIO()
    numpy.savez(buffer, arr_0=array)   # one array named arr_0, as in the official files
    return buffer.getvalue()


def idx_bytes(array: numpy.ndarray, magic: int | None = None) -> bytes:
    magic = magic if magic is not None else (2051 if array.ndim == 3 else 2049)
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return gzip.compress(header + array.astype(numpy.uint8).tobytes())


def write_split(folder: Path, split: str, images, labels, layout: str = "npz") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    names, encode = (NPZ_NAMES, npz_bytes) if layout == "npz" else (IDX_NAMES, idx_bytes)
    (folder / names[(split, "images")]).write_bytes(encode(images))
    (folder / names[(split, "labels")]).write_bytes(encode(labels))


@pytest.fixture
def kmnist_dir(tmp_path):
    """A folder with small train (60) and test (30) files in the npz layout."""
    folder = tmp_path / "kmnist"
    write_split(folder, "train", *make_kmnist(60, seed=1))
    write_split(folder, "test", *make_kmnist(30, seed=2))
    return folder


@pytest.mark.parametrize("layout", ["npz", "idx"])
def test_kmnist_reads_each_official_layout(tmp_path, layout):
    train, test = make_kmnist(60, seed=1), make_kmnist(30, seed=2)
    write_split(tmp_path, "train", *train, layout=layout)
    write_split(tmp_path, "test", *test, layout=layout)
    data = load_kmnist(tmp_path, verify=False, download=False)
    assert data.name == "kmnist" and data.split == "official" and data.image_shape == (28, 28)
    assert data.x_train.shape == (60, 784) and data.x_test.shape == (30, 784)
    assert data.x_train.dtype == numpy.float32 and data.y_train.dtype == numpy.int64
    numpy.testing.assert_array_equal(data.x_train, train[0].reshape(60, 784) / numpy.float32(255))
    numpy.testing.assert_array_equal(data.y_test, test[1])
    assert 0.0 <= data.x_test.min() and data.x_test.max() <= 1.0
    assert data.source == tmp_path and len(data.files) == 4
    assert data.notes == []


def test_kmnist_layouts_can_mix_between_splits(tmp_path):
    write_split(tmp_path, "train", *make_kmnist(20, seed=1), layout="idx")
    write_split(tmp_path, "test", *make_kmnist(10, seed=2), layout="npz")
    data = load_kmnist(tmp_path, verify=False, download=False)
    assert (len(data.y_train), len(data.y_test)) == (20, 10)


def corrupt_cases():
    images, labels = make_kmnist(10)
    good_npz, good_idx = npz_bytes(images), idx_bytes(images)
    ungzipped = gzip.decompress(good_idx)
    flipped = bytearray(good_npz)
    flipped[len(flipped) // 2] ^= 0xFF                 # one bit-flipped byte: zip's CRC catches it
    return [
        ("npz", "images", good_npz[: len(good_npz) // 2], r"cannot be read as an \.npz archive"),
        ("npz", "images", bytes(flipped), r"corrupt or truncated \(BadZipFile: Bad CRC-32"),
        ("npz", "images", b"not a zip file at all", r"cannot be read as an \.npz archive"),
        ("npz", "images", b"", r"cannot be read as an \.npz archive: the file is empty"),
        ("npz", "images", pickle.dumps(images), r"\.npz archive: it is a pickle"),
        ("npz", "images", npy_bytes(images), r"\.npz archive: it is a single NumPy array \(\.npy"),
        ("npz", "images", _npz_with(x=images), r"must hold an array named 'arr_0'"),
        ("npz", "images", npz_bytes(images[:, :27]), r"uint8 images of shape \(n, 28, 28\)"),
        ("npz", "images", npz_bytes(images.astype(numpy.float32)), r"uint8 images"),
        ("npz", "labels", npz_bytes(labels + 5), r"labels in \[0, 10\)\. Got values in \[5, 14\]"),
        ("idx", "images", good_idx[: len(good_idx) // 2], r"not a complete gzip file"),
        ("idx", "images", gzip.compress(ungzipped[:-100]), r"header announces \(10, 28, 28\)"),
        ("idx", "images", idx_bytes(images, magic=2049), r"IDX magic number 2051 .* Got 2049"),
        ("idx", "labels", idx_bytes(labels, magic=2051), r"IDX magic number 2049 .* Got 2051"),
        ("idx", "labels", gzip.compress(b"\x00\x00"), r"too short to hold an IDX header"),
    ]


def npy_bytes(array) -> bytes:
    buffer = io.BytesIO()
    numpy.save(buffer, array)
    return buffer.getvalue()


def _npz_with(**arrays) -> bytes:
    buffer = io.BytesIO()
    numpy.savez(buffer, **arrays)
    return buffer.getvalue()


@pytest.mark.parametrize("layout, kind, payload, message", corrupt_cases())
def test_kmnist_corrupt_file_is_reported_never_used(tmp_path, layout, kind, payload, message):
    write_split(tmp_path, "test", *make_kmnist(10), layout=layout)
    bad = tmp_path / (NPZ_NAMES if layout == "npz" else IDX_NAMES)[("test", kind)]
    bad.write_bytes(payload)
    with pytest.raises(ValueError, match=message) as info:
        load_kmnist(tmp_path, train_from_test=0.5, verify=False, download=False)
    assert str(bad) in str(info.value) and "It was not used" in str(info.value)
    # With downloading allowed but impossible (no network), still an error, never used.
    with pytest.raises(ValueError, match="replacing it failed"):
        load_kmnist(tmp_path, train_from_test=0.5, verify=False)


def test_kmnist_images_and_labels_must_pair(tmp_path):
    images, labels = make_kmnist(10)
    write_split(tmp_path, "test", images, labels[:9])
    with pytest.raises(ValueError, match=r"holds 10 images, but .* holds 9 labels"):
        load_kmnist(tmp_path, train_from_test=0.5, verify=False, download=False)


def test_kmnist_verify_compares_with_the_official_checksums(kmnist_dir):
    with pytest.raises(ValueError, match=r"kmnist-test-imgs\.npz has [\d,]+ bytes, but the "
                                         r"official file has 3,079,479 \(truncated or corrupt\)"):
        load_kmnist(kmnist_dir, download=False)


def test_kmnist_missing_training_files_say_which_where_and_how(tmp_path):
    write_split(tmp_path, "test", *make_kmnist(10))
    (tmp_path / NPZ_NAMES[("train", "labels")]).write_bytes(npz_bytes(make_kmnist(10)[1]))
    with pytest.raises(FileNotFoundError) as info:
        load_kmnist(tmp_path, verify=False, download=False)
    message = str(info.value)
    assert f"{tmp_path}: missing kmnist-train-imgs.npz; has kmnist-train-labels.npz" in message
    assert "http://codh.rois.ac.jp/kmnist/dataset/kmnist/kmnist-train-imgs.npz" in message
    assert "train-images-idx3-ubyte.gz" in message and "train_from_test" in message
    assert "download=False" in message


def test_kmnist_named_folder_never_falls_back(tmp_path):
    empty = tmp_path / "nothing-here"
    with pytest.raises(FileNotFoundError, match=re.escape(f"{empty}: no such folder")) as info:
        load_kmnist(empty, allow_fallback=True)
    assert "The automatic download failed" in str(info.value)
    assert "kmnist-test-imgs.npz" in str(info.value)


def test_kmnist_default_search_and_digits_fallback(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv("CUPYNN_DATA", raising=False)
    with pytest.raises(FileNotFoundError) as info:
        load_kmnist(download=False)
    message = str(info.value)
    assert str(work / "datasets" / "kmnist") in message
    assert str(tmp_path / "shared" / "data" / "kmnist") in message

    fallback = load_kmnist(allow_fallback=True, progress=False)
    assert fallback.name == "sklearn-digits" and fallback.image_shape == (8, 8)
    assert fallback.x_train.shape[1] == 64 and fallback.x_train.dtype == numpy.float32
    assert 0.0 <= fallback.x_train.min() and fallback.x_train.max() <= 1.0
    assert "KMNIST was not found" in fallback.notes[0] and "digits" in fallback.notes[0]
    assert len(fallback.y_train) + len(fallback.y_test) == 1797

    # $CUPYNN_DATA/kmnist is searched first.
    write_split(tmp_path / "data" / "kmnist", "test", *make_kmnist(20))
    monkeypatch.setenv("CUPYNN_DATA", str(tmp_path / "data"))
    data = load_kmnist(train_from_test=0.5, verify=False, download=False)
    assert data.name == "kmnist" and data.source == tmp_path / "data" / "kmnist"


def test_kmnist_train_from_test_is_a_stratified_seeded_split(kmnist_dir):
    (kmnist_dir / NPZ_NAMES[("train", "images")]).unlink()   # not needed
    a = load_kmnist(kmnist_dir, train_from_test=0.8, seed=3, verify=False, download=False)
    b = load_kmnist(kmnist_dir, train_from_test=0.8, seed=3, verify=False, download=False)
    c = load_kmnist(kmnist_dir, train_from_test=0.8, seed=4, verify=False, download=False)
    assert (len(a.y_train), len(a.y_test)) == (24, 6)
    # 3 images per class, 2.4 of each for training: the 4 extra rows go to the first 4 classes
    numpy.testing.assert_array_equal(numpy.bincount(a.y_train), [3, 3, 3, 3, 2, 2, 2, 2, 2, 2])
    numpy.testing.assert_array_equal(a.x_train, b.x_train)
    assert not numpy.array_equal(a.x_train, c.x_train)
    assert a.split == "train_from_test=0.8 (stratified, seed 3)"
    assert "stratified split of the official KMNIST test images" in a.notes[0]


@pytest.mark.parametrize("value", [0, 1.0, 1.5, -0.2, float("nan")])
def test_kmnist_train_from_test_must_be_a_fraction(kmnist_dir, value):
    with pytest.raises(ValueError, match=r"The 'train_from_test' parameter of load_kmnist must "):
        load_kmnist(kmnist_dir, train_from_test=value, verify=False)


# -- downloads (fetch_url replaced) -----------------------------------------------------------

def official_table_for(monkeypatch, split: str, files: dict[str, bytes], n: int) -> None:
    """Make the tiny files of ``split`` the 'official' ones: their sizes and MD5s, n rows."""
    for kind in ("images", "labels"):
        name = NPZ_NAMES[(split, kind)]
        payload = files[name]
        monkeypatch.setitem(LAYOUTS["npz"], (split, kind),
                            OfficialFile(name, len(payload), hashlib.md5(payload).hexdigest()))
    monkeypatch.setitem(kmnist.N_IMAGES, split, n)


def test_kmnist_downloads_missing_files_into_the_folder(tmp_path, monkeypatch):
    images, labels = make_kmnist(20)
    files = {NPZ_NAMES[("train", "images")]: npz_bytes(images),
             NPZ_NAMES[("train", "labels")]: npz_bytes(labels)}
    official_table_for(monkeypatch, "train", files, 20)
    fetched = serve(monkeypatch, files)
    write_split(tmp_path, "test", *make_kmnist(10))
    data = load_kmnist(tmp_path, verify=False, progress=False)
    assert fetched == [kmnist.BASE_URL + name for name in files]
    for name, payload in files.items():
        assert (tmp_path / name).read_bytes() == payload
    assert not list(tmp_path.glob("*.part"))
    assert len(data.y_train) == 20 and data.split == "official"
    assert sum("Downloaded" in note for note in data.notes) == 2


def test_kmnist_default_download_folder_is_datasets_kmnist(tmp_path, monkeypatch):
    files = {}
    for split, n in (("train", 20), ("test", 10)):
        images, labels = make_kmnist(n)
        part = {NPZ_NAMES[(split, "images")]: npz_bytes(images),
                NPZ_NAMES[(split, "labels")]: npz_bytes(labels)}
        official_table_for(monkeypatch, split, part, n)
        files.update(part)
    serve(monkeypatch, files)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CUPYNN_DATA", raising=False)
    data = load_kmnist(progress=False)            # verify=True against the patched table
    cache = tmp_path / "datasets" / "kmnist"
    assert data.source == cache and sorted(p.name for p in cache.iterdir()) == sorted(files)
    assert (len(data.y_train), len(data.y_test)) == (20, 10)


def test_kmnist_checksum_mismatch_is_reported_and_replaced(tmp_path, monkeypatch):
    images, labels = make_kmnist(10)
    files = {NPZ_NAMES[("test", "images")]: npz_bytes(images),
             NPZ_NAMES[("test", "labels")]: npz_bytes(labels)}
    official_table_for(monkeypatch, "test", files, 10)
    for name, payload in files.items():
        (tmp_path / name).write_bytes(payload)
    bad = tmp_path / NPZ_NAMES[("test", "images")]
    bad.write_bytes(npz_bytes(255 - images))          # same size, other bytes: only MD5 tells
    fetched = serve(monkeypatch, files)
    data = load_kmnist(tmp_path, train_from_test=0.5, progress=False)
    assert fetched == [kmnist.BASE_URL + bad.name]
    assert bad.read_bytes() == files[bad.name]
    note = next(n for n in data.notes if "replaced" in n)
    assert str(bad) in note and "has MD5" in note and "not the official file" in note
    numpy.testing.assert_allclose(
        numpy.sort(numpy.concatenate([data.x_train, data.x_test]).sum(axis=1)),
        numpy.sort(images.reshape(10, -1).sum(axis=1) / 255), rtol=1e-6)


def test_kmnist_replacement_that_fails_its_checksum_is_an_error(tmp_path, monkeypatch):
    images, labels = make_kmnist(10)
    files = {NPZ_NAMES[("test", "images")]: npz_bytes(images),
             NPZ_NAMES[("test", "labels")]: npz_bytes(labels)}
    official_table_for(monkeypatch, "test", files, 10)
    (tmp_path / NPZ_NAMES[("test", "labels")]).write_bytes(files[NPZ_NAMES[("test", "labels")]])
    bad = tmp_path / NPZ_NAMES[("test", "images")]
    corrupt = files[bad.name][:-10]
    bad.write_bytes(corrupt)
    serve(monkeypatch, {bad.name: files[bad.name][:-1] + b"!"})   # the server is wrong too
    with pytest.raises(ValueError, match=r"replacing it failed: The file downloaded from "
                                         r".* has MD5 .* it was discarded"):
        load_kmnist(tmp_path, train_from_test=0.5, progress=False)
    assert bad.read_bytes() == corrupt and not list(tmp_path.glob("*.part"))


def test_kmnist_real_files_replace_a_truncated_copy(tmp_path, monkeypatch):
    """The genuine files and their official MD5s: a truncated copy is replaced by the real bytes."""
    shared = shared_data("kmnist")
    names = [NPZ_NAMES[("test", "images")], NPZ_NAMES[("test", "labels")]]
    real = {name: (shared / name).read_bytes() for name in names}
    (tmp_path / names[0]).write_bytes(real[names[0]][:100_000])
    (tmp_path / names[1]).write_bytes(real[names[1]])
    serve(monkeypatch, real)
    data = load_kmnist(tmp_path, train_from_test=0.8, progress=False)
    assert (tmp_path / names[0]).read_bytes() == real[names[0]]
    assert "has 100,000 bytes, but the official file has 3,079,479 (truncated or corrupt)" \
        in data.notes[0]
    assert (len(data.y_train), len(data.y_test)) == (8000, 2000)


def test_download_file_checks_size_and_reports_the_url(tmp_path, monkeypatch):
    serve(monkeypatch, {"f.bin": b"12345"})
    dest = tmp_path / "sub" / "f.bin"
    assert download_file("http://example.org/f.bin", dest, size=5, progress=False) == dest
    assert dest.read_bytes() == b"12345"
    with pytest.raises(DownloadError, match=r"has 5 bytes, but the official file has 6 "
                                            r"\(truncated or corrupt\); it was discarded"):
        download_file("http://example.org/f.bin", tmp_path / "g.bin", size=6, progress=False)
    with pytest.raises(DownloadError, match=r"Downloading http://example.org/missing to .* failed "
                                            r"\(OSError: 404"):
        download_file("http://example.org/missing", tmp_path / "h.bin", progress=False)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["f.bin", "sub"]


# -- KMNIST: the real files -------------------------------------------------------------------

def test_kmnist_real_test_images_verified_and_split_8000_2000():
    folder = shared_data("kmnist")
    for kind in ("images", "labels"):
        official = LAYOUTS["npz"][("test", kind)]
        assert checksum_problem(folder / official.name, official.size, official.md5) is None
    data = load_kmnist(folder, train_from_test=0.8, seed=0, download=False)   # verify=True
    again = load_kmnist(folder, train_from_test=0.8, seed=0, download=False)
    assert data.name == "kmnist" and data.source == folder
    assert data.x_train.shape == (8000, 784) and data.x_test.shape == (2000, 784)
    numpy.testing.assert_array_equal(numpy.bincount(data.y_train), [800] * 10)
    numpy.testing.assert_array_equal(numpy.bincount(data.y_test), [200] * 10)
    numpy.testing.assert_array_equal(data.x_train, again.x_train)
    numpy.testing.assert_array_equal(data.y_test, again.y_test)
    assert data.x_train.dtype == numpy.float32 and data.x_train.max() == 1.0
    assert data.x_train.min() == 0.0


def test_kmnist_real_folder_lacks_the_training_images():
    folder = shared_data("kmnist")
    with pytest.raises(FileNotFoundError) as info:
        load_kmnist(folder, download=False)
    message = str(info.value)
    assert f"{folder}: missing kmnist-train-imgs.npz; has kmnist-train-labels.npz" in message


# -- stratified split ---------------------------------------------------------------------------

def test_stratified_split_partitions_with_class_shares():
    labels = numpy.repeat([0, 1, 2], [10, 7, 3])
    train, test = stratified_split(labels, 0.5, seed=0)
    assert len(train) == 10 and len(test) == 10
    numpy.testing.assert_array_equal(numpy.sort(numpy.concatenate([train, test])), numpy.arange(20))
    assert numpy.all(numpy.diff(train) > 0) and numpy.all(numpy.diff(test) > 0)
    # exact shares 5, 3.5, 1.5: the 10th row goes to the class with the larger remainder (ties: 1)
    numpy.testing.assert_array_equal(numpy.bincount(labels[train]), [5, 4, 1])
    with pytest.raises(ValueError, match=r"The 'train_fraction' parameter of stratified_split "
                                         r"must be in \(0, 1\)\. Got 1\.0 instead\."):
        stratified_split(labels, 1.0)


def test_digits_records_its_name():
    data = load_digits(seed=1)
    assert isinstance(data, Dataset) and data.name == "sklearn-digits"
    assert "sklearn-digits" in data.summary() and data.train[0] is data.x_train


# -- HIGGS --------------------------------------------------------------------------------------

def higgs_rows(n: int, seed: int = 0) -> numpy.ndarray:
    rng = numpy.random.default_rng(seed)
    table = rng.normal(1.0, 2.0, size=(n, 29))
    table[:, 0] = rng.integers(0, 2, size=n)
    return table


def write_higgs(path: Path, table: numpy.ndarray, *, fmt: str = "%.18e",
                lines: list[str] | None = None) -> Path:
    """Write rows as the official file does (``%.18e``, comma-separated, no header)."""
    if lines is None:
        buffer = io.StringIO()
        numpy.savetxt(buffer, table, fmt=fmt, delimiter=",")
        text = buffer.getvalue()
    else:
        text = "".join(line + "\n" for line in lines)
    data = text.encode()
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def test_higgs_parses_the_official_layout_in_blocks(tmp_path):
    table = higgs_rows(300)
    path = write_higgs(tmp_path / "HIGGS.csv.gz", table)
    x, y = read_higgs_csv(path)
    assert x.shape == (300, 21) and x.dtype == numpy.float32 and y.dtype == numpy.uint8
    numpy.testing.assert_array_equal(x, table[:, 1:22].astype(numpy.float32))
    numpy.testing.assert_array_equal(y, table[:, 0])
    x_small, y_small = read_higgs_csv(path, block_bytes=1000)    # many blocks, lines cut anywhere
    numpy.testing.assert_array_equal(x_small, x)
    numpy.testing.assert_array_equal(y_small, y)
    plain = tmp_path / "plain.csv"
    plain.write_bytes(gzip.decompress(path.read_bytes()).rstrip(b"\n"))   # no final newline
    numpy.testing.assert_array_equal(read_higgs_csv(plain, block_bytes=777)[0], x)


def malformed_cases():
    good = ",".join(["1"] + ["0.5"] * 28)
    return [
        (2, ",".join(["1"] + ["0.5"] * 27), r"must hold 29 comma-separated values .* Got 28 "
                                            r"instead"),
        (2, good + ",0.5", r"must hold 29 comma-separated values .* Got 30 instead"),
        (3, good.replace("0.5", "abc", 6).replace("abc", "0.5", 5),
         r"must hold numbers only\. Got 'abc' in column 7 instead"),
        (1, "2" + good[1:], r"must start with a label of 0 or 1\. Got 2 instead"),
        (2, "0.5" + good[1:], r"must start with a label of 0 or 1\. Got 0\.5 instead"),
        (3, good.replace("0.5", "nan", 1), r"must hold finite features\. Got nan in column 2"),
        (2, "", r"must hold 29 comma-separated values .* Got an empty line instead"),
    ]


@pytest.mark.parametrize("line, text, message", malformed_cases())
def test_higgs_malformed_line_names_file_and_line(tmp_path, line, text, message):
    good = ",".join(["1"] + ["0.5"] * 28)
    lines = [good] * 5
    lines[line - 1] = text
    path = write_higgs(tmp_path / "bad.csv.gz", None, lines=lines)
    with pytest.raises(ValueError, match=f"Line {line} of {re.escape(str(path))} {message}"):
        read_higgs_csv(path)


def test_higgs_line_numbers_count_across_blocks(tmp_path):
    table = higgs_rows(400)
    buffer = io.StringIO()
    numpy.savetxt(buffer, table, fmt="%.6f", delimiter=",")
    lines = buffer.getvalue().splitlines()
    lines[356] = lines[356].replace(",", ";", 1)
    path = write_higgs(tmp_path / "bad.csv.gz", None, lines=lines)
    with pytest.raises(ValueError, match=r"Line 357 of .* Got 28 instead"):
        read_higgs_csv(path, block_bytes=2000)


def test_higgs_truncated_or_empty_file(tmp_path):
    path = write_higgs(tmp_path / "HIGGS.csv.gz", higgs_rows(2000))
    path.write_bytes(path.read_bytes()[:-5000])
    with pytest.raises(ValueError, match=r"HIGGS\.csv\.gz is truncated or corrupt: reading "
                                         r"it failed after [\d,]+ complete lines .* Download it"):
        read_higgs_csv(path, block_bytes=4096)
    empty = tmp_path / "empty.csv.gz"
    empty.write_bytes(gzip.compress(b""))
    with pytest.raises(ValueError, match=r"empty\.csv\.gz must hold at least one line"):
        load_higgs(empty, cache=False, progress=False)


def test_higgs_seeded_split_standardised_with_training_stats(tmp_path):
    table = higgs_rows(200)
    path = write_higgs(tmp_path / "HIGGS-sample.csv.gz", table)
    data = load_higgs(path, seed=5, train_samples=100, val_samples=30, test_share=0.25,
                      cache_dir=tmp_path / "cache", progress=False)
    assert data.name == "higgs-subset" and data.source == path
    assert (data.n_train_rows, data.n_test_rows) == (150, 50)
    assert data.split == "seeded random, test_share=0.25 (seed 5)"
    assert "seeded random split holds out test_share=0.25" in data.notes[1]
    assert data.x_train.dtype == numpy.float32 and data.y_train.dtype == numpy.float32
    numpy.testing.assert_allclose(data.x_train.mean(axis=0), 0, atol=1e-5)
    numpy.testing.assert_allclose(data.x_train.std(axis=0), 1, atol=1e-5)
    # The statistics are those of the raw training rows alone: find them by undoing the
    # standardisation and matching each row to its nearest raw row.
    raw = table[:, 1:22].astype(numpy.float32).astype(numpy.float64)
    back = data.x_train.astype(numpy.float64) * data.std + data.mean
    distance = numpy.abs(back[:, None, :] - raw[None, :, :]).max(axis=2)
    rows = distance.argmin(axis=1)
    assert distance.min(axis=1).max() < 1e-4 and len(set(rows)) == 150
    numpy.testing.assert_allclose(data.mean, raw[rows].mean(axis=0), rtol=1e-9)
    numpy.testing.assert_allclose(data.std, raw[rows].std(axis=0), rtol=1e-9)
    assert data.x_val.shape == (30, 21) and set(numpy.unique(data.y_val)) <= {0.0, 1.0}
    again = load_higgs(path, seed=5, train_samples=100, val_samples=30, test_share=0.25,
                       cache_dir=tmp_path / "cache", progress=False)
    numpy.testing.assert_array_equal(again.x_val, data.x_val)


def test_higgs_complete_file_uses_the_official_split(tmp_path, monkeypatch):
    monkeypatch.setattr(higgs, "N_ROWS", 100)
    monkeypatch.setattr(higgs, "N_TEST_ROWS", 20)
    table = higgs_rows(100, seed=3)
    path = write_higgs(tmp_path / "HIGGS.csv.gz", table)
    data = load_higgs(path, val_samples=10, train_samples=50, cache=False, progress=False)
    assert data.name == "higgs" and data.split == "official"
    numpy.testing.assert_array_equal(data.y_test, table[80:, 0])
    numpy.testing.assert_array_equal(data.y_train, table[:80, 0])
    numpy.testing.assert_allclose(data.mean, table[:80, 1:22].astype(numpy.float32).mean(axis=0),
                                  rtol=1e-6)
    numpy.testing.assert_allclose(data.x_test, (table[80:, 1:22].astype(numpy.float32)
                                                - data.mean) / data.std, rtol=1e-5, atol=1e-6)
    assert data.notes == [next(n for n in data.notes if n.startswith("Parsed"))]


def test_higgs_sample_epoch_and_caps(tmp_path):
    path = write_higgs(tmp_path / "h.csv.gz", higgs_rows(100))
    data = load_higgs(path, train_samples=30, val_samples=10, cache=False, progress=False)
    x1, y1 = data.sample_epoch(numpy.random.default_rng(7))
    x2, y2 = data.sample_epoch(numpy.random.default_rng(7))
    x3, _ = data.sample_epoch(numpy.random.default_rng(8))
    assert x1.shape == (30, 21) and x1.dtype == numpy.float32 and y1.dtype == numpy.float32
    numpy.testing.assert_array_equal(x1, x2)
    numpy.testing.assert_array_equal(y1, y2)
    assert not numpy.array_equal(x1, x3)
    assert len({row.tobytes() for row in x1}) == 30     # distinct rows
    capped = load_higgs(path, train_samples=1000, val_samples=1000, cache=False, progress=False)
    assert capped.train_samples == capped.n_train_rows == 80 and len(capped.y_val) == 20
    assert any("train_samples=1,000 is capped to the 80 training rows" in n for n in capped.notes)
    assert any("val_samples=1,000 is capped to the 20 test rows" in n for n in capped.notes)
    x_all, _ = capped.sample_epoch(numpy.random.default_rng(0))
    assert sorted(map(bytes, x_all)) == sorted(map(bytes, capped.x_train))
    with pytest.raises(TypeError, match="must be a numpy.random.Generator"):
        data.sample_epoch(7)


def test_higgs_cache_is_used_and_invalidated(tmp_path):
    path = write_higgs(tmp_path / "HIGGS-sample.csv.gz", higgs_rows(50, seed=1))
    cache_dir = tmp_path / "cache"
    first = load_higgs(path, cache_dir=cache_dir, progress=False)
    assert first.notes[0].startswith("Parsed 50 rows") and len(list(cache_dir.glob("*.npz"))) == 1
    second = load_higgs(path, cache_dir=cache_dir, progress=False)
    assert second.notes[0].startswith("Read the parsed rows of HIGGS-sample.csv.gz from the cache")
    numpy.testing.assert_array_equal(first.x_train, second.x_train)
    write_higgs(path, higgs_rows(60, seed=2))          # the source changes: size and mtime
    os.utime(path, ns=(1, 1))
    third = load_higgs(path, cache_dir=cache_dir, progress=False)
    assert third.notes[0].startswith("Parsed 60 rows")
    (next(cache_dir.glob("*.npz"))).write_bytes(b"garbage")       # a broken cache is re-made
    assert load_higgs(path, cache_dir=cache_dir, progress=False).notes[0].startswith("Parsed")
    assert not list(cache_dir.glob("*.tmp"))
    nocache = tmp_path / "nocache"
    load_higgs(path, cache=False, cache_dir=nocache, progress=False)
    assert not nocache.exists()


def test_higgs_missing_file_names_places_and_url(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CUPYNN_DATA", raising=False)
    with pytest.raises(FileNotFoundError) as info:
        find_higgs()
    message = str(info.value)
    assert "HIGGS.csv.gz or HIGGS-sample.csv.gz" in message and higgs.URL in message
    assert f"{tmp_path / 'datasets' / 'higgs'} (no such folder)" in message
    with pytest.raises(FileNotFoundError, match=r"nope\.csv\.gz does not exist"):
        load_higgs(tmp_path / "nope.csv.gz")
    # search order: the full file, wherever it is, before a sample
    (tmp_path / "datasets" / "higgs").mkdir(parents=True)
    sample = write_higgs(tmp_path / "datasets" / "higgs" / "HIGGS-sample.csv.gz", higgs_rows(5))
    (tmp_path / "env" / "higgs").mkdir(parents=True)
    monkeypatch.setenv("CUPYNN_DATA", str(tmp_path / "env"))
    assert find_higgs() == sample
    full = write_higgs(tmp_path / "env" / "higgs" / "HIGGS.csv.gz", higgs_rows(5))
    assert find_higgs() == full and find_higgs(tmp_path / "env" / "higgs") == full


@pytest.mark.parametrize("kwargs, message", [
    ({"test_share": 1.0}, r"The 'test_share' parameter of load_higgs must be in \(0, 1\)\. "
                          r"Got 1\.0 instead\."),
    ({"train_samples": 0}, r"The 'train_samples' parameter of load_higgs must be in \[1, inf\]\. "
                           r"Got 0 instead\."),
    ({"val_samples": -1}, r"The 'val_samples' parameter of load_higgs must be in \[1, inf\]"),
])
def test_higgs_bad_parameters(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        load_higgs(tmp_path, **kwargs)


def test_higgs_real_sample(tmp_path):
    path = shared_data("higgs", "HIGGS-sample.csv.gz")
    data = load_higgs(path, seed=0, cache_dir=tmp_path, progress=False)   # default sizes
    assert data.n_train_rows + data.n_test_rows == 25_972
    assert data.name == "higgs-subset" and data.x_train.shape[1] == 21
    numpy.testing.assert_allclose(data.x_train.mean(axis=0), 0, atol=1e-4)
    numpy.testing.assert_allclose(data.x_train.std(axis=0), 1, atol=1e-4)
    assert 0.5 < data.y_train.mean() < 0.56
    assert any(f"val_samples=100,000 is capped to the {data.n_test_rows:,} test rows" in n
               for n in data.notes)
    assert any("train_samples=500,000 is capped" in n for n in data.notes)
    x1, y1 = data.sample_epoch(numpy.random.default_rng(1))
    x2, y2 = data.sample_epoch(numpy.random.default_rng(1))
    numpy.testing.assert_array_equal(x1, x2)
    numpy.testing.assert_array_equal(y1, y2)


# -- augmentation -------------------------------------------------------------------------------

def images_batch(n=4, shape=(28, 28), dtype=numpy.float32, seed=0):
    return numpy.random.default_rng(seed).random((n, shape[0] * shape[1])).astype(dtype)


@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64])
def test_affine_identity_returns_the_input_exactly(backend, dtype):
    x = backend.asarray(images_batch(dtype=dtype))
    off = RandomAffine(rotation=0, translation=0, scale=(1, 1))
    assert off.is_identity and off(x, numpy.random.default_rng(0)) is x
    same = affine_transform(x, (28, 28), numpy.zeros(4), numpy.zeros((4, 2)), numpy.ones(4))
    assert same.dtype == dtype
    numpy.testing.assert_array_equal(to_numpy(same), to_numpy(x))


@pytest.mark.parametrize("shape", [(28, 28), (7, 7), (6, 6)])
def test_affine_quarter_turns_match_rot90(backend, shape):
    x = images_batch(n=3, shape=shape)
    for angle, k in ((90, 1), (-90, -1), (180, 2)):
        out = affine_transform(backend.asarray(x), shape, numpy.full(3, angle), numpy.zeros((3, 2)),
                               numpy.ones(3))
        expected = numpy.rot90(x.reshape(3, *shape), k=k, axes=(1, 2)).reshape(3, -1)
        numpy.testing.assert_allclose(to_numpy(out), expected, atol=1e-5)


def test_affine_integer_shift_matches_roll_with_zeros(backend):
    shape = (6, 10)
    x = images_batch(n=2, shape=shape)
    out = affine_transform(backend.asarray(x), shape, numpy.zeros(2),
                           numpy.array([[2.0, -3.0], [-1.0, 4.0]]), numpy.ones(2))
    images = x.reshape(2, *shape)
    expected = numpy.zeros_like(images)
    expected[0, 2:, :-3] = images[0, :-2, 3:]       # 2 rows down, 3 columns left
    expected[1, :-1, 4:] = images[1, 1:, :-4]       # 1 row up, 4 columns right
    numpy.testing.assert_allclose(to_numpy(out), expected.reshape(2, -1), atol=1e-6)


def test_affine_scale_two_magnifies_about_the_centre(backend):
    image = numpy.zeros((5, 5), numpy.float32)
    image[2, 2], image[2, 3] = 1.0, 0.5            # the centre pixel and its right neighbour
    out = affine_transform(backend.asarray(image.reshape(1, -1)), (5, 5), numpy.zeros(1),
                           numpy.zeros((1, 2)), numpy.array([2.0]))
    out = to_numpy(out).reshape(5, 5)
    # the output column 4 reads the input at column 3 (centre 2 + 2/2): a half-way point is 0.75
    assert out[2, 2] == 1.0 and out[2, 4] == 0.5 and out[2, 3] == 0.75


def test_affine_random_draws_are_reproducible_and_stay_in_range(backend):
    x = backend.asarray(images_batch(n=16))
    augment = RandomAffine()
    assert repr(augment) == ("RandomAffine(rotation=10, translation=2, scale=(0.9, 1.1), "
                             "image_shape=(28, 28))")
    a = to_numpy(augment(x, numpy.random.default_rng(3)))
    b = to_numpy(augment(x, numpy.random.default_rng(3)))
    c = to_numpy(augment(x, numpy.random.default_rng(4)))
    numpy.testing.assert_array_equal(a, b)
    assert not numpy.allclose(a, c) and not numpy.allclose(a, to_numpy(x))
    assert a.shape == (16, 784) and a.dtype == numpy.float32
    assert a.min() >= 0.0 and a.max() <= 1.0 + 1e-6      # bilinear blends of values in [0, 1]
    # the same draws on the host give the same result (so CPU and GPU agree)
    angles, shifts, scales = augment.sample(16, numpy.random.default_rng(3))
    assert numpy.all(numpy.abs(angles) <= 10) and numpy.all(numpy.abs(shifts) <= 2)
    assert numpy.all((0.9 <= scales) & (scales <= 1.1))
    host = affine_transform(to_numpy(x), (28, 28), angles, shifts, scales)
    numpy.testing.assert_allclose(a, host, atol=1e-5)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"rotation": -1}, ValueError, r"The 'rotation' parameter of RandomAffine must be in "
                                   r"\[0, 180\]\. Got -1\.0 instead\."),
    ({"translation": float("inf")}, ValueError, r"The 'translation' parameter of RandomAffine"),
    ({"scale": (1.1, 0.9)}, ValueError, r"The 'scale' parameter of RandomAffine must be a pair "
                                        r"\(low, high\) with 0 < low <= high\. Got \(1\.1, 0\.9\)"),
    ({"scale": 1.0}, ValueError, r"The 'scale' parameter of RandomAffine"),
    ({"image_shape": (28,)}, ValueError, r"The 'image_shape' parameter of RandomAffine must be a "
                                         r"pair of positive ints"),
])
def test_affine_bad_parameters(kwargs, error, message):
    with pytest.raises(error, match=message):
        RandomAffine(**kwargs)


def test_affine_bad_inputs():
    augment = RandomAffine()
    rng = numpy.random.default_rng(0)
    with pytest.raises(ValueError, match=r"The 'x' parameter of RandomAffine must have shape "
                                         r"\(batch, 784\) for images of shape \(28, 28\)\. "
                                         r"Got \(2, 64\) instead\."):
        augment(numpy.zeros((2, 64), numpy.float32), rng)
    with pytest.raises(TypeError, match=r"must be a float array\. Got uint8 instead\."):
        augment(numpy.zeros((2, 784), numpy.uint8), rng)
    with pytest.raises(TypeError, match=r"The 'rng' parameter of RandomAffine must be a "
                                        r"numpy\.random\.Generator\. Got int instead\."):
        augment(numpy.zeros((2, 784), numpy.float32), 0)
    with pytest.raises(ValueError, match=r"must have shapes \(2,\), \(2, 2\) and \(2,\)"):
        affine_transform(numpy.zeros((2, 784)), (28, 28), [0], [[0, 0]], [1])
