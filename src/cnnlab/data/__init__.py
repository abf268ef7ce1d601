"""Datasets for cnnlab: built-in MNIST, Fashion-MNIST and CIFAR-10, read from local files or downloaded.

Typical use::

    from cnnlab.data import load_dataset
    train = load_dataset("mnist", "train")   # ArrayDataset: images uint8 [N, 1, 28, 28], labels int64 [N]
"""

from . import folder  # noqa: F401  (registers the folder:PATH dataset prefix)
from .sources import ArrayDataset, DatasetInfo, dataset_info, list_datasets, load_dataset, validation_split

__all__ = ["ArrayDataset", "DatasetInfo", "dataset_info", "list_datasets", "load_dataset", "validation_split"]
