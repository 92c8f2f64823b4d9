"""Clean data sets: the in-memory split type, the registry of loaders, batching."""

from . import cifar, gtsrb, idx, rof, tiny  # noqa: F401  (each registers its loaders)
from .base import DATASETS, INFO, DataError, DataNotFoundError, DatasetInfo, ImageSet, dataset_info, load_split  # noqa: F401
