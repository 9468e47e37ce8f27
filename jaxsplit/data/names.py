"""Human-readable class names of the datasets jaxsplit knows, for reports and plots.

    >>> class_names("fashion_mnist")[:3]
    ('T-shirt/top', 'Trouser', 'Pullover')
    >>> class_names("cifar10", classes=(3, 5))
    ('cat', 'dog')
"""

from __future__ import annotations

from collections.abc import Sequence

from jaxsplit.data.idx import FASHION_MNIST_CLASS_NAMES
from jaxsplit.data.sources import CIFAR10_CLASS_NAMES

__all__ = ["CIFAR100_CLASS_NAMES", "DIGIT_CLASS_NAMES", "class_names", "class_name"]

DIGIT_CLASS_NAMES = tuple(str(d) for d in range(10))

# CIFAR-100 fine labels, in label order (as TFDS and the original release number them).
CIFAR100_CLASS_NAMES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup",
    "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house",
    "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man",
    "maple_tree", "motorcycle", "mountain", "mouse", "mushroom", "oak_tree", "orange", "orchid",
    "otter", "palm_tree", "pear", "pickup_truck", "pine_tree", "plain", "plate", "poppy",
    "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket", "rose", "sea", "seal",
    "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider", "squirrel", "streetcar",
    "sunflower", "sweet_pepper", "table", "tank", "telephone", "television", "tiger", "tractor",
    "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
)

_NAMES: dict[str, tuple[str, ...]] = {
    "fashion_mnist": FASHION_MNIST_CLASS_NAMES,
    "mnist": DIGIT_CLASS_NAMES,
    "cifar10": CIFAR10_CLASS_NAMES,
    "cifar100": CIFAR100_CLASS_NAMES,
    "svhn": DIGIT_CLASS_NAMES,
    "svhn_cropped": DIGIT_CLASS_NAMES,
}


def _key(dataset: str) -> str:
    return str(dataset).lower().replace("-", "_").replace(" ", "_")


def class_names(dataset: str | None, classes: Sequence[int] | None = None,
                num_classes: int | None = None) -> tuple[str, ...]:
    """The names of a dataset's classes, or of the chosen ``classes`` in that order.

    Args:
      dataset: a dataset name (``fashion_mnist``, ``mnist``, ``cifar10``, ``cifar100``,
        ``svhn``/``svhn_cropped``; ``-`` and case are ignored). An unknown name (``synthetic``,
        an ``npz`` file) or None gives ``class_0, class_1, ...``.
      classes: dataset class ids to name (default: all of them).
      num_classes: how many ``class_i`` names to give for an unknown dataset when ``classes``
        is None (default 10).

    Returns:
      One name per class.

    Raises:
      ValueError: a class id outside the dataset's classes.
    """
    table = _NAMES.get(_key(dataset)) if dataset is not None else None
    if classes is None:
        if table is not None:
            return table
        return tuple(f"class_{c}" for c in range(10 if num_classes is None else int(num_classes)))
    out = []
    for c in classes:
        if isinstance(c, bool) or int(c) != c:
            raise ValueError(f"class id {c!r} is not an integer")
        c = int(c)
        if table is None:
            out.append(f"class_{c}")
        elif not 0 <= c < len(table):
            raise ValueError(f"class id {c} is out of range for {dataset!r}: expected 0..{len(table) - 1}")
        else:
            out.append(table[c])
    return tuple(out)


def class_name(dataset: str | None, class_id: int) -> str:
    """The name of one class (see `class_names`)."""
    return class_names(dataset, (class_id,))[0]
