"""Tests of jaxsplit.data.class_names: the names reports and plots show instead of class ids."""

import pytest

from jaxsplit.data import CIFAR100_CLASS_NAMES, class_name, class_names


def test_known_datasets():
    assert class_names("fashion_mnist") == ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                                            "Shirt", "Sneaker", "Bag", "Ankle boot")
    assert class_names("Fashion-MNIST", (9, 0)) == ("Ankle boot", "T-shirt/top")
    assert class_names("cifar10", (0, 3, 9)) == ("airplane", "cat", "truck")
    assert class_names("svhn", (4,)) == ("4",) and class_names("svhn_cropped") == tuple("0123456789")
    assert len(CIFAR100_CLASS_NAMES) == len(set(CIFAR100_CLASS_NAMES)) == 100
    assert class_name("cifar100", 0) == "apple" and class_name("cifar100", 99) == "worm"


def test_unknown_datasets_and_bad_ids():
    assert class_names("synthetic", (2, 5)) == ("class_2", "class_5")
    assert class_names(None, num_classes=3) == ("class_0", "class_1", "class_2")
    with pytest.raises(ValueError, match=r"class id 10 is out of range for 'cifar10': expected 0..9"):
        class_names("cifar10", (10,))
    with pytest.raises(ValueError, match="not an integer"):
        class_names("cifar10", (1.5,))
