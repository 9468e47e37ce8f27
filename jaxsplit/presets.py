"""Configs embedded in the package (so `jaxsplit demo` needs no file).

`DEMO` equals `configs/fashion_mnist_cpu.yaml` (a test checks that they never drift): a small
SimCNN on Fashion-MNIST sized for a 2-core CPU, with the demo's budget for every stage:

* train: 4 epochs of Adam on the 48k training images (~2 min, >= 90% test accuracy;
  benchmarks/results/train.json);
* search: 16 individuals per class, 10 generations, 1,000 valid images, the CPU initial
  population (importance-led: `init_temperature` 1, conv_0/conv_1 kept whole; see
  configs/fashion_mnist_cpu_modularize.yaml for why, and for the larger CPU search budget);
* patch: the "self" task on the demo's one 10-class strong model: its modules of classes 0-4
  patch weak CNNs trained for 3 epochs on classes 5-9 + that class (500 training images of
  each class, as in the reference's CIFAR-100 task).

The whole demo must stay within 15 min on 2 CPU cores (benchmarks/results/demo.json).
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
    "search": {
        "population_size": 16,
        "num_generations": 10,
        "num_valid": 1000,
        "sensitive_layers": [0, 1],
        "init_ratios_sensitive": [1.0],
        "init_ratios_other": [0.5, 0.6, 0.7, 0.8],
        "init_temperature": 1.0,
        "backend": "auto",
        "seed": 0,
    },
    "patch": {
        "task": "self",
        "strong_classes": [0, 1, 2, 3, 4],
        "weak_classes": [5, 6, 7, 8, 9],
        "target_classes": None,
        "tc_train_images": 500,
        "weak_images_per_class": 500,
        "weak_model": "weak_cnn",
        "weak_width": 0.5,
        "weak_optimizer": "adam",
        "weak_learning_rate": 0.001,
        "weak_epochs": 3,
        "calibrations": ["min_max", "percentile", "iqr", "z_norm", "platt"],
        "seed": 0,
    },
}

DEMO = FASHION_MNIST_CPU
