"""Tests for ilbp.data: IDX/text/TFDS sources and the deterministic batch pipeline.

Nothing here downloads: TFDS is exercised through `tfds.testing.mock_data` and through an
empty temporary data_dir (which must fail fast with a clear message).
"""

import gzip
import os
import sys
import time

import numpy as np
import pytest

from ilbp import data
from ilbp.data import idx as idx_lib
from ilbp.data import text as text_lib

# ---------------------------------------------------------------------------- helpers


def _toy_source(n=37, shape=(6, 5, 2)):
    """Images whose every pixel holds the example's index, so batches reveal indices."""
    inputs = np.broadcast_to(np.arange(n, dtype=np.float32)[:, None, None, None], (n, *shape))
    info = data.DatasetInfo(kind="image", example_shape=shape, num_classes=n)
    return data.ArraySource({"inputs": inputs.copy(), "label": np.arange(n, dtype=np.int32)}, info)


class _ListSource:
    """A plain list-like source without `getitems` (the per-example fetch path)."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"inputs": np.full((3,), i, np.int32), "targets": np.full((3,), i, np.int32)}


def _collect(it, steps):
    return [next(it) for _ in range(steps)]


def _equal(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _write_idx_dir(directory, n_train=50, n_test=20, compress=True, hw=(7, 9)):
    rng = np.random.default_rng(0)
    ext = ".gz" if compress else ""
    arrays = {}
    for stem, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, *hw), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        data.write_idx(os.path.join(directory, f"{stem}-images-idx3-ubyte{ext}"), images)
        data.write_idx(os.path.join(directory, f"{stem}-labels-idx1-ubyte{ext}"), labels)
        arrays[stem] = (images, labels)
    return arrays


# ------------------------------------------------------------------------------- specs


def test_parse_dataset():
    assert data.parse_dataset("idx") == data.DatasetSpec("idx", "idx", data.DEFAULT_IDX_DIR)
    assert data.parse_dataset("idx:/d").path == "/d"
    assert data.parse_dataset("text:/a/**/*.txt") == data.DatasetSpec("text", "text", "/a/**/*.txt")
    std = data.parse_dataset("stdlib")
    assert std.path == data.stdlib_glob() and "site-packages" in std.exclude
    assert data.parse_dataset("cifar10") == data.DatasetSpec("tfds", "cifar10")
    assert data.parse_dataset("tfds:lm1b:1.1.0").name == "lm1b:1.1.0"
    for bad in ("", "text:", "Not A Name"):
        with pytest.raises(ValueError):
            data.parse_dataset(bad)


# --------------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int32, np.float32, np.float64])
def test_idx_round_trip(tmp_path, compress, dtype):
    array = (np.arange(2 * 3 * 4) - 5).astype(dtype).reshape(2, 3, 4)
    if dtype == np.uint8:
        array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    path = str(tmp_path / "a.idx")
    data.write_idx(path, array, compress=compress)
    with open(path, "rb") as f:
        assert (f.read(2) == b"\x1f\x8b") == compress
    back = data.read_idx(path)
    assert back.dtype == array.dtype and np.array_equal(back, array)


def test_idx_magic_numbers_and_errors(tmp_path):
    path = str(tmp_path / "labels")
    data.write_idx(path, np.arange(5, dtype=np.uint8))
    raw = (tmp_path / "labels").read_bytes()
    assert raw[:4] == b"\x00\x00\x08\x01" and raw[4:8] == (5).to_bytes(4, "big")
    data.write_idx(path, np.zeros((2, 3, 4), np.uint8))
    assert (tmp_path / "labels").read_bytes()[:4] == b"\x00\x00\x08\x03"
    with pytest.raises(ValueError, match="not an IDX"):
        idx_lib.parse_idx(b"PK\x03\x04")
    with pytest.raises(ValueError, match="size mismatch"):
        idx_lib.parse_idx(raw[:-1])


@pytest.mark.parametrize("compress", [True, False])
def test_idx_images_source(tmp_path, compress):
    arrays = _write_idx_dir(str(tmp_path), compress=compress)
    train = data.make_split(f"idx:{tmp_path}", "train")
    test = data.make_split(f"idx:{tmp_path}", "test")
    assert (len(train), len(test)) == (50, 20)
    assert train.info.example_shape == (7, 9, 1) and train.info.kind == "image"
    assert train.info.num_classes == int(arrays["train"][1].max()) + 1
    ex = test[3]
    assert ex["inputs"].dtype == np.float32 and ex["inputs"].shape == (7, 9, 1)
    assert ex["label"].dtype == np.int32 and ex["label"] == arrays["t10k"][1][3]
    # Standardized with the training set's statistics, for both splits.
    x = train.getitems(np.arange(50))["inputs"]
    assert abs(x.mean()) < 1e-4 and abs(x.std() - 1) < 1e-4
    pixels = arrays["train"][0].astype(np.float64) / 255
    expected = (arrays["t10k"][0][3] / 255 - pixels.mean()) / pixels.std()
    np.testing.assert_allclose(ex["inputs"][..., 0], expected, rtol=1e-5, atol=1e-5)


def test_idx_dot_names(tmp_path):
    """Some distributions name files train-images.idx3-ubyte."""
    for stem in ("train", "t10k"):
        data.write_idx(str(tmp_path / f"{stem}-images.idx3-ubyte"), np.zeros((4, 2, 2), np.uint8))
        data.write_idx(str(tmp_path / f"{stem}-labels.idx1-ubyte"), np.ones(4, np.uint8))
    assert len(data.make_split(f"idx:{tmp_path}", "test")) == 4


@pytest.mark.skipif(
    not os.path.isdir(data.DEFAULT_IDX_DIR), reason="dataset-fashion-mnist not installed"
)
def test_real_fashion_mnist():
    train, test = data.make_split("idx", "train"), data.make_split("idx", "test")
    assert (len(train), len(test)) == (60000, 10000)
    assert train[0]["inputs"].shape == (28, 28, 1) and train.info.num_classes == 10
    assert train.info.default_augment is None
    labels = test.getitems(np.arange(10000))["label"]
    assert np.array_equal(np.bincount(labels), np.full(10, 1000))


@pytest.mark.parametrize("content", [b"<html>not found</html>", b"\x1f\x8b broken gzip"])
def test_a_file_that_is_not_idx_is_named(tmp_path, content):
    _write_idx_dir(str(tmp_path), compress=True)
    bad = tmp_path / "t10k-images-idx3-ubyte.gz"
    bad.write_bytes(content)
    with pytest.raises(ValueError, match=f"{bad}: "):
        data.make_split(f"idx:{tmp_path}", "test")


def test_idx_missing(tmp_path):
    with pytest.raises(data.DataMissingError, match="idx:DIR"):
        data.make_split(f"idx:{tmp_path}", "train")
    msg = idx_lib.missing_message(data.DEFAULT_IDX_DIR, "train")
    assert "sudo apt-get install dataset-fashion-mnist" in msg


# -------------------------------------------------------------------------------- text


def _write_tree(root, n_files=60):
    rng = np.random.default_rng(1)
    for i in range(n_files):
        sub = root / f"pkg{i % 4}" / ("deep" if i % 3 else "")
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"f{i}.txt").write_bytes(bytes(rng.integers(32, 127, 50 + i, dtype=np.uint8)))
    (root / "top.txt").write_bytes(b"top level file\n")
    (root / "skip.md").write_bytes(b"not matched")
    (root / ".hidden.txt").write_bytes(b"hidden")
    (root / "site-packages").mkdir()
    (root / "site-packages" / "x.txt").write_bytes(b"excluded")


def test_glob_matching(tmp_path):
    _write_tree(tmp_path)
    root, files = text_lib.list_files(str(tmp_path / "**" / "*.txt"))
    assert root == str(tmp_path) and "top.txt" in files and "site-packages/x.txt" in files
    assert not any(f.endswith(".md") or "/." in "/" + f for f in files)
    assert len(files) == 62
    _, files = text_lib.list_files(str(tmp_path / "**" / "*.txt"), exclude=("site-packages",))
    assert len(files) == 61
    _, files = text_lib.list_files(str(tmp_path / "pkg[01]" / "*.txt"))
    assert files and all(f.count("/") == 1 and f[3] in "01" for f in files)
    _, files = text_lib.list_files(str(tmp_path / "pkg1"))  # a directory: everything in it
    assert len(files) == 15


def test_text_windows_and_heldout_split(tmp_path):
    _write_tree(tmp_path)
    pattern = str(tmp_path / "**" / "*.txt")
    train_tokens, train_files = text_lib.read_split(pattern, "train")
    _, test_files = text_lib.read_split(pattern, "test")
    assert test_files and not set(train_files) & set(test_files)
    assert len(train_files) + len(test_files) == 62
    assert set(test_files) == {f for f in train_files + test_files if text_lib.is_heldout(f)}
    # The split is a function of relative paths only: a moved tree splits the same way.
    moved = tmp_path.parent / (tmp_path.name + "_moved")
    os.rename(tmp_path, moved)
    assert text_lib.read_split(str(moved / "**" / "*.txt"), "test")[1] == test_files

    src = data.make_split(f"text:{moved}/**/*.txt", "train", seq_len=16)
    assert src.info.vocab_size == 256 and len(src) == (len(train_tokens) - 1) // 16
    ex = src[2]
    assert ex["inputs"].dtype == np.int32 and ex["inputs"].shape == (16,)
    assert np.array_equal(ex["inputs"][1:], ex["targets"][:-1])
    assert np.array_equal(ex["inputs"], train_tokens[32:48])
    assert np.array_equal(ex["targets"], train_tokens[33:49])
    batch = src.getitems(np.array([0, 1]))  # windows overlap by one token
    assert batch["targets"][0, -1] == batch["inputs"][1, 0]


def test_text_single_file_splits_by_position(tmp_path):
    path = tmp_path / "one.txt"
    path.write_bytes(bytes(range(200)))
    train, _ = text_lib.read_split(str(path), "train")
    test, _ = text_lib.read_split(str(path), "test")
    assert np.array_equal(np.concatenate([train, test]), np.arange(200)) and len(test) == 10


def test_text_missing(tmp_path):
    with pytest.raises(data.DataMissingError, match="text:GLOB"):
        data.make_split(f"text:{tmp_path}/**/*.txt")


def test_stdlib_corpus():
    spec = data.parse_dataset("stdlib")
    root, files = text_lib.list_files(spec.path, spec.exclude)
    if not files:
        pytest.skip("this Python has no .py standard-library sources")
    assert "os.py" in files and not any("site-packages" in f for f in files)
    sizes = sum(os.path.getsize(os.path.join(root, f)) for f in files)
    assert 5e6 < sizes < 60e6


# ------------------------------------------------------------------------------ batches


def test_batches_deterministic_and_epoch_permutations():
    src = _toy_source()
    a = _collect(data.batches(src, 8, seed=3, shard_by_process=False), 12)
    b = _collect(data.batches(src, 8, seed=3, shard_by_process=False), 12)
    c = _collect(data.batches(src, 8, seed=4, shard_by_process=False), 12)
    assert all(_equal(x, y) for x, y in zip(a, b))
    assert not all(_equal(x, y) for x, y in zip(a, c))
    it = data.batches(src, 8, seed=3, shard_by_process=False)
    assert it.steps_per_epoch == 4
    epochs = [np.concatenate([x["label"] for x in a[i : i + 4]]) for i in (0, 4, 8)]
    for labels in epochs:  # 32 of 37 examples, none twice
        assert len(set(labels.tolist())) == 32
    assert not np.array_equal(epochs[0], epochs[1])
    assert np.array_equal(a[0]["inputs"][:, 0, 0, 0], a[0]["label"])
    unshuffled = next(data.batches(src, 8, seed=3, shuffle=False, shard_by_process=False))
    assert np.array_equal(unshuffled["label"], np.arange(8))


@pytest.mark.parametrize("augment", [None, "crop_flip"])
def test_batches_resume(augment):
    src = _toy_source()
    kw = dict(seed=7, augment=augment, shard_by_process=False, num_epochs=3)
    full = list(data.batches(src, 8, **kw))
    assert len(full) == 12
    for start in (0, 3, 5, 11):
        resumed = list(data.batches(src, 8, start_step=start, **kw))
        assert len(resumed) == 12 - start
        assert all(_equal(x, y) for x, y in zip(full[start:], resumed))
    it = data.batches(src, 8, **kw)
    _collect(it, 6)
    assert it.step == 6 and _equal(next(it), full[6]) and _equal(it.batch_at(2), full[2])


@pytest.mark.parametrize("augment", [None, "crop_flip"])
def test_batches_process_shards(augment):
    src = _toy_source()
    single = _collect(data.batches(src, 8, seed=1, augment=augment, shard_by_process=False), 9)
    shards = [
        _collect(data.batches(src, 8, seed=1, augment=augment, process_index=p, process_count=2), 9)
        for p in (0, 1)
    ]
    for step in range(9):
        s0, s1 = shards[0][step], shards[1][step]
        assert len(s0["label"]) == 4 and not set(s0["label"]) & set(s1["label"])
        joined = {k: np.concatenate([s0[k], s1[k]]) for k in s0}
        assert _equal(joined, single[step])
    with pytest.raises(ValueError, match="divisible"):
        data.batches(src, 9, seed=0, process_index=0, process_count=2)


@pytest.mark.parametrize("drop_remainder", [True, False])
def test_microbatched_process_shards(drop_remainder):
    """With M microbatches a shard is its block of every microbatch, microbatch after
    microbatch (the rows a data shard holds after the spmd B -> M × b split); padded
    last batches too."""
    src, M, P = _toy_source(), 2, 2
    kw = dict(seed=1, num_epochs=1, drop_remainder=drop_remainder)
    steps = 3 if drop_remainder else 4  # 37 = 3 · 12 + 1
    single = _collect(data.batches(src, 12, **kw, shard_by_process=False), steps)
    for p in range(P):
        it = data.batches(src, 12, **kw, process_index=p, process_count=P, microbatches=M)
        for step, rows in enumerate(_collect(it, steps)):
            for key, value in single[step].items():
                want = value.reshape(M, P, 3, *value.shape[1:])[:, p]
                np.testing.assert_array_equal(rows[key], want.reshape(6, *value.shape[1:]))
    if not drop_remainder:  # the last batch's first row is real
        last = data.batches(src, 12, **kw, process_index=0, process_count=P, microbatches=M)
        assert last.batch_at(3)["mask"].tolist() == [1, 0, 0, 0, 0, 0]
    with pytest.raises(ValueError, match="2 processes × 4 microbatches"):
        data.batches(src, 12, seed=0, process_index=0, process_count=2, microbatches=4)


def test_default_process_sharding_uses_jax():
    import jax

    it = data.batches(_toy_source(), 8, seed=0)
    assert it.local_batch_size == 8 // jax.process_count()


def test_eval_batches_pad_and_mask():
    src = _toy_source(n=37)
    seen, total = [], 0.0
    for p in range(3):
        it = data.eval_batches(src, 12, process_index=p, process_count=3)
        batches = list(it)
        assert len(batches) == 4  # every process runs the same number of steps
        for b in batches:
            assert b["inputs"].shape == (4, 6, 5, 2) and b["mask"].dtype == np.float32
            assert np.array_equal(b["weights"], b["mask"])
            real = b["mask"] > 0
            seen += b["label"][real].tolist()
            total += b["mask"].sum()
            assert not b["inputs"][~real].any()
    assert sorted(seen) == list(range(37)) and total == 37


def test_eval_batches_text_weights_and_list_source():
    batches = list(data.eval_batches(_ListSource(5), 4, shard_by_process=False))
    assert [b["mask"].tolist() for b in batches] == [[1, 1, 1, 1], [1, 0, 0, 0]]
    assert batches[1]["weights"].shape == (4, 3)
    assert np.array_equal(batches[1]["weights"][:, 0], batches[1]["mask"])
    assert batches[1]["inputs"][0, 0] == 4 and not batches[1]["inputs"][1:].any()


def test_augment_crop_flip():
    x = np.random.default_rng(0).normal(size=(16, 8, 8, 3)).astype(np.float32)
    words = data.hash_words(0, 2, 0, np.arange(16))
    flipped = data.get_augment("flip")({"inputs": x}, words)["inputs"]
    for a, b in zip(x, flipped):
        assert np.array_equal(a, b) or np.array_equal(a[:, ::-1], b)
    assert any(not np.array_equal(a, b) for a, b in zip(x, flipped))
    cropped = data.get_augment("crop_flip")({"inputs": x, "label": np.arange(16)}, words)
    assert cropped["inputs"].shape == x.shape and np.array_equal(cropped["label"], np.arange(16))
    again = data.get_augment("crop_flip")({"inputs": x}, words)["inputs"]
    assert np.array_equal(cropped["inputs"], again)
    assert data.get_augment("none") is None
    with pytest.raises(ValueError, match="Unknown augmentation"):
        data.get_augment("mixup")


def test_sources_work_with_grain():
    import grain

    ds = grain.MapDataset.source(_toy_source()).shuffle(seed=0)
    assert len(ds) == 37 and ds[0]["inputs"].shape == (6, 5, 2)


# -------------------------------------------------------------------------------- TFDS


def test_tfds_mock_cifar10_and_lm1b():
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=12):
        src = data.make_split("cifar10", "train")
        assert len(src) == 12 and src.info.num_classes == 10
        assert src.info.default_augment == "crop_flip"
        ex = src[0]
        assert ex["inputs"].shape == (32, 32, 3) and ex["inputs"].dtype == np.float32
        assert ex["label"].dtype == np.int32
        it = data.batches(src, 4, seed=0, augment=src.info.default_augment)
        assert next(it)["inputs"].shape == (4, 32, 32, 3)

        text = data.make_split("lm1b", "test", seq_len=32)
        assert text.info.vocab_size == 256
        ex = text[1]
        assert {k: (v.dtype, v.shape) for k, v in ex.items()} == {
            "inputs": (np.int32, (32,)),
            "targets": (np.int32, (32,)),
            "weights": (np.float32, (32,)),
        }
        n = int(ex["weights"].sum())
        assert ex["inputs"][0] == ord("\n") and np.array_equal(
            ex["inputs"][1:n], ex["targets"][: n - 1]
        )
        assert not ex["targets"][n:].any()
    assert "tensorflow" not in sys.modules  # data_source path works without TensorFlow


@pytest.fixture(scope="module")
def tiny_tfds_dir(tmp_path_factory):
    """Two tiny TFDS datasets prepared offline as array_record (no TensorFlow needed:
    Tensor and Text features encode without it; the Image feature would not)."""
    import tensorflow_datasets as tfds

    class _Tiny(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(10), "test": self._generate_examples(4)}

    class IlbpTinyImages(_Tiny):
        def _info(self):
            features = {
                "image": tfds.features.Tensor(shape=(8, 8, 3), dtype=np.uint8),
                "label": tfds.features.ClassLabel(num_classes=3),
            }
            return tfds.core.DatasetInfo(
                builder=self, features=tfds.features.FeaturesDict(features)
            )

        def _generate_examples(self, n):
            for i in range(n):
                yield i, {"image": np.full((8, 8, 3), 10 * i, np.uint8), "label": i % 3}

    class IlbpTinyText(_Tiny):
        def _info(self):
            features = tfds.features.FeaturesDict({"text": tfds.features.Text()})
            return tfds.core.DatasetInfo(builder=self, features=features)

        def _generate_examples(self, n):
            for i in range(n):
                yield i, {"text": f"sentence {i} é"}

    data_dir = str(tmp_path_factory.mktemp("tfds"))
    config = tfds.download.DownloadConfig(try_download_gcs=False)
    for cls in (IlbpTinyImages, IlbpTinyText):
        # A one-part module name keeps TFDS's code_path lookup off the optional
        # importlib_resources package (needed for namespace packages such as tests/).
        cls.__module__ = "ilbp_data_test"
        cls(data_dir=data_dir, file_format="array_record").download_and_prepare(
            download_config=config
        )
    return data_dir


def test_tfds_real_array_record(tiny_tfds_dir):
    """The unmocked tfds data_source path: prepared files, decoded without TensorFlow."""
    images = data.make_split("ilbp_tiny_images", "test", data_dir=tiny_tfds_dir)
    assert len(images) == 4 and images.info.num_classes == 3
    assert images.info.example_shape == (8, 8, 3)
    labels = sorted(int(images[i]["label"]) for i in range(4))
    assert labels == [0, 0, 1, 2]
    ex = images[0]
    value = (ex["inputs"][0, 0, 0] * 0.5 + 0.5) * 255  # constant image 10*i; stats 0.5/0.5
    assert ex["inputs"].dtype == np.float32 and abs(value - round(value)) < 1e-3
    assert round(value) % 10 == 0
    batch = next(data.batches(images, 4, seed=0, augment="flip", shard_by_process=False))
    assert batch["inputs"].shape == (4, 8, 8, 3)

    text = data.make_split("tfds:ilbp_tiny_text", "train", seq_len=20, data_dir=tiny_tfds_dir)
    assert len(text) == 10
    ex = text[0]
    sentence = bytes(ex["targets"][ex["weights"] > 0].astype(np.uint8)).decode()
    assert sentence.startswith("sentence ") and sentence.endswith(" é")
    assert "tensorflow" not in sys.modules


def test_tfds_not_prepared_fails_fast(tmp_path):
    start = time.monotonic()
    with pytest.raises(data.DataMissingError, match="tfds build cifar10") as err:
        data.make_split("cifar10", "train", data_dir=str(tmp_path))
    assert "TFDS_DATA_DIR" in str(err.value)
    assert time.monotonic() - start < 20
    assert not any(p.is_file() for p in tmp_path.rglob("*"))  # nothing was fetched
    with pytest.raises(ValueError, match="neither a TFDS dataset"):
        data.make_split("no_such_dataset_xyz", data_dir=str(tmp_path))


def test_sentencepiece_is_optional(monkeypatch):
    """The byte tokenizer needs nothing; without `sentencepiece` (simulated, so the test
    asserts the same whether or not it is installed) spm asks for it by name."""
    from ilbp.data.tfds_sources import make_tokenizer

    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # `import` raises ImportError
    encode, vocab = make_tokenizer("byte")
    assert vocab == 256 and encode("hé").tolist() == [10, 104, 195, 169]
    with pytest.raises(ImportError, match="optional `sentencepiece`"):
        make_tokenizer("spm:/nonexistent.model")
    with pytest.raises(ValueError, match="Unknown tokenizer 'bpe'"):
        make_tokenizer("bpe")


def test_gzip_detected_by_content(tmp_path):
    raw = bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 8, 9])
    (tmp_path / "x").write_bytes(gzip.compress(raw))
    assert data.read_idx(str(tmp_path / "x")).tolist() == [7, 8, 9]


# --------------------------------------------------------------------- grain pipeline


class _RecordingSource(data.ArraySource):
    """Records every index it is asked for."""

    def __init__(self, n):
        src = _toy_source(n)
        super().__init__(src.arrays, src.info)
        self.fetched = []

    def getitems(self, indices):
        self.fetched += np.asarray(indices).tolist()
        return super().getitems(indices)


def test_each_shard_fetches_only_its_rows():
    fetched = []
    for p in (0, 1):
        src = _RecordingSource(37)
        it = data.batches(src, 8, seed=2, process_index=p, process_count=2, prefetch=0)
        labels = [x for b in _collect(it, 4) for x in b["label"].tolist()]
        assert src.fetched == labels and len(labels) == 16
        fetched.append(set(labels))
    assert not fetched[0] & fetched[1]


def test_epochs_reshuffle_and_consecutive_seeds_are_unrelated():
    """grain reseeds epoch e with seed + e; the pipeline hashes the seed first, so seed 0's
    second epoch is not seed 1's first."""
    src = _toy_source(40)

    def epoch(seed, e):
        it = data.batches(src, 40, seed=seed, shard_by_process=False)
        return it.batch_at(e)["label"]

    assert sorted(epoch(0, 1)) == list(range(40))
    assert not np.array_equal(epoch(0, 0), epoch(0, 1))
    assert not np.array_equal(epoch(0, 1), epoch(1, 0))


def test_padded_epochs_each_cover_every_example_once():
    src = _toy_source(37)
    kw = dict(seed=5, num_epochs=2, drop_remainder=False, augment="flip", process_count=2)
    shards = [list(data.batches(src, 8, process_index=p, **kw)) for p in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 10  # 5 steps per epoch, 2 epochs
    orders = []
    for e in (0, 1):
        steps = range(5 * e, 5 * e + 5)
        rows = [shards[p][s] for s in steps for p in (0, 1)]
        order = np.concatenate([b["label"][b["mask"] > 0] for b in rows])
        assert sorted(order) == list(range(37)) and sum(b["mask"].sum() for b in rows) == 37
        orders.append(order)
    assert not np.array_equal(orders[0], orders[1])


def test_prefetch_threads_and_workers_give_the_same_batches():
    """Read-ahead (threads, or a grain worker process) changes nothing, also when `step`
    is moved during iteration (what a resume does)."""
    src = _toy_source()
    kw = dict(seed=3, augment="crop_flip", shard_by_process=False, num_epochs=2)
    plain = list(data.batches(src, 8, prefetch=0, **kw))
    it = data.batches(src, 8, start_step=2, prefetch=3, **kw)
    got = _collect(it, 3)
    it.step = 1
    got += list(it)
    expected = plain[2:5] + plain[1:]
    assert len(got) == len(expected) and all(_equal(a, b) for a, b in zip(got, expected))
    it = data.batches(src, 8, start_step=2, worker_count=1, **kw)
    got = list(it)
    assert len(got) == 6 and all(_equal(a, b) for a, b in zip(got, plain[2:]))
    it.close()
    del got  # worker batches live in shared memory: free them while grain runs
