"""Configs embedded in the package (so `jaxsplit demo` needs no file).

`DEMO` equals `configs/fashion_mnist_cpu.yaml` (a test checks that they never drift): a small
SimCNN on Fashion-MNIST sized for a 2-core CPU.
"""

from __future__ import annotations

__all__ = ["DEMO", "FASHION_MNIST_CPU"]

FASHION_MNIST_CPU: dict = {
    "name": "fashion_mnist_cpu",
    "data": {
        "source": "auto",
        "name": "fashion_mnist",
        "valid_fraction": 0.2,
        "split_seed": 1009,
        "image_size": 32,
        "normalization": "dataset",
    },
    "model": {"name": "simcnn", "width": 0.125, "dropout": 0.0},
    "train": {
        "optimizer": "adam",
        "learning_rate": 0.002,
        "weight_decay": 0.0,
        "schedule": "cosine",
        "warmup_epochs": 0,
        "epochs": 4,
        "batch_size": 64,
        "eval_batch_size": 500,
        "seed": 0,
        "augment": False,
    },
    "search": {"population_size": 30, "num_generations": 30, "num_valid": 2000, "seed": 0},
}

DEMO = FASHION_MNIST_CPU
