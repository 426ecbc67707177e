"""Models and datasets for the ``tekfax-compare`` experiments (docs/algorithms.md, section 7).

``tekfax.experiments.models`` holds the Flax Linen models (MLP, deep auto-encoder, digits CNN,
ResNet20, VGG16) and ``tekfax.experiments.data`` the datasets (scikit-learn digits; CIFAR-10,
CIFAR-100 and SVHN through ``tensorflow_datasets``, imported only when one is loaded).
"""
