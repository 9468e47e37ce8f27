"""`jaxsplit modularize` with `search.method=gradient`: the gradient searcher's I/O edge.

Same run folder as the GA (`run_dir/modularize/`): checkpoints `search_ckpt/epoch_XXXXX`
(orbax, every `search.checkpoint_every` epochs; `--resume` continues bit-identically), and
`modules.npz` (a `jaxsplit.Modules` file with the per-module heads and `info["method"] ==
"gradient"`: `Modules.load(path, graph)`), `masks.npz` (the best valid epoch's mask per class:
arrays named by site, leading C axis, the GA's format), `heads.npz` (the per-module heads,
leading C axis, names `dense_0/kernel`...), `history.json`, `summary.json` (with `"method":
"gradient"` and the searcher's settings), `config.yaml` (the resolved config the search started
with). Files that already exist are never overwritten.

Any model `checkpoint.load_model` rebuilds works: the masks are over its traced kernel graph
(`jaxsplit.trace`). A jaxsplit `ConvNet` (SimCNN, ResCNN) is searched through its own masking
(`GradSplitter.for_convnet`: the mask multiplies each conv's post-ReLU output before the pool,
as the reference does, docs/method.md §10); other models through the graph
(`GradSplitter.for_graph`, which masks each consumer's input: the same forward pass, but after
a max-pool a dropped kernel's mask gets another gradient, so the two do not train identically).

The modules are trained on the modularization-train split and the best epoch is chosen on the
valid split (docs/method.md §10); the test split is only measured at the end.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxsplit import checkpoint as ckpt
from jaxsplit import config as jconfig
from jaxsplit import extract
from jaxsplit import io as jio
from jaxsplit import modularize as modz
from jaxsplit.search import driver as D
from jaxsplit.search import gradient as G


def ensemble_diff(masks: Mapping[str, np.ndarray]) -> float:
    """Mean over class pairs of 1 - Jaccard of the kept-kernel sets (docs/method.md §6)."""
    flat = np.concatenate([np.asarray(v, bool) for v in masks.values()], axis=-1)  # (C, K)
    c = flat.shape[0]
    vals = []
    for i in range(c):
        for j in range(i + 1, c):
            union = np.logical_or(flat[i], flat[j]).sum()
            inter = np.logical_and(flat[i], flat[j]).sum()
            vals.append(1.0 - (inter / union if union else 1.0))
    return float(np.mean(vals)) if vals else 0.0


def run_gradient_modularize(run_dir: str | os.PathLike, cfg, resume: bool = False, *,
                            progress: bool = True, data: tuple | None = None,
                            on_checkpoint: Callable[[int], None] | None = None) -> dict:
    """Train gradient masks for the model in `run_dir` (arguments as `driver.run_modularize`).

    Returns:
      the summary dict (also written to `modularize/summary.json`).
    """
    from jaxsplit import pipeline

    run_dir = Path(run_dir)
    out_dir = run_dir / D.MODULARIZE_DIRNAME
    ckpt_root = out_dir / D.CKPT_DIRNAME
    scfg, gcfg = cfg.search, cfg.search.gradient
    existing = G.list_checkpoints(ckpt_root) or D.list_checkpoints(ckpt_root)
    if not resume and (existing or (out_dir / "masks.npz").exists()):
        raise D.SearchError(
            f"{str(out_dir)!r} already holds a search (checkpoints or masks.npz); pass resume=True "
            f"(--resume) to continue it, or use another run folder")
    if D.list_checkpoints(ckpt_root):
        raise D.SearchError(f"{str(ckpt_root)!r} holds GA checkpoints; a gradient search cannot "
                            f"resume them (use another run folder or search.method=ga)")
    loaded = ckpt.load_model(run_dir)
    model, params, train_cfg = loaded.model, loaded.params, loaded.cfg
    apply_fn, variables = loaded.apply_fn, loaded.variables
    model_desc = pipeline.model_description(train_cfg.model, model)
    train, valid, test = pipeline.prepare_data(cfg.data) if data is None else data
    num_valid = len(valid) if scfg.num_valid is None else min(scfg.num_valid, len(valid))
    v_images = np.asarray(valid.images[:num_valid], np.float32)
    v_labels = np.asarray(valid.labels[:num_valid], np.int32)
    graph = modz.trace_graph(apply_fn, variables, v_images[:1])
    num_classes = int(graph.num_outputs)
    if valid.num_classes != num_classes:
        raise D.SearchError(f"the data has {valid.num_classes} classes but the model "
                            f"{num_classes}; use the run's data config")
    class_names = list(valid.class_names) if valid.class_names else [str(c) for c in range(num_classes)]
    classes = np.arange(num_classes, dtype=np.int32)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not existing:  # a new search: keep its settings for `--resume` and the report
        jio.atomic_write_text(out_dir / D.CONFIG_FILE, D._yaml_dump(jconfig.to_dict(cfg)))

    num_train = len(train) if gcfg.num_train is None else min(gcfg.num_train, len(train))
    try:  # a ConvNet keeps the reference's masking (see the module docstring)
        splitter = G.GradSplitter.for_model(graph, apply_fn, cfg=gcfg, num_classes=num_classes)
    except G.GradientError as e:
        raise D.SearchError(str(e)) from e
    state = splitter.init(jax.random.key(scfg.seed))
    fp = D.fingerprint(cfg, model_desc, params)
    t0 = time.perf_counter()
    try:
        state, history = G.train(
            splitter, state, variables,
            (np.asarray(train.images[:num_train], np.float32), np.asarray(train.labels[:num_train], np.int32)),
            (v_images, v_labels), checkpoint_dir=ckpt_root, checkpoint_every=scfg.checkpoint_every,
            resume=resume, progress=progress, fingerprint=fp, on_checkpoint=on_checkpoint)
    except G.GradientError as e:
        raise D.ResumeError(str(e)) from e
    train_time = time.perf_counter() - t0

    result, repairs = splitter.keep_one_per_site(state, splitter.result(state))
    if repairs:
        D.log.warning("%d module site(s) kept no kernel; kept the kernel closest to being kept there "
                      "(recorded in summary.json as repaired_empty_sites): %s", len(repairs),
                      ", ".join(f"class {r['class']} at {r['site']}" for r in repairs[:8]))
    D._save_npz(out_dir / "masks.npz", result.masks)
    heads = {k.replace(".", "/"): np.asarray(v) for k, v in D._flat_items(result.head_params).items()}
    D._save_npz(out_dir / "heads.npz", heads)

    modules_path = out_dir / D.MODULES_FILE
    if not (modules_path.exists() and D._readable(modules_path)):
        modz.Modules.from_gradient(
            splitter, result, apply_fn, variables, graph=graph, class_names=class_names,
            history=history, search=scfg,
            info={"num_train_images": int(num_train), "num_valid_images": int(num_valid)},
        ).save(modules_path)

    free = {k: result.masks[k] for k in splitter.free}
    heads_dev = jax.tree_util.tree_map(jnp.asarray, result.head_params) if gcfg.head == "mlp" else {}
    ens_valid = splitter.evaluate(free, variables, v_images, v_labels, heads=heads_dev)
    ens_test = splitter.evaluate(free, variables, np.asarray(test.images, np.float32),
                                 np.asarray(test.labels, np.int32), heads=heads_dev)
    model_acc = {}
    apply = jax.jit(lambda xb: jnp.argmax(apply_fn(variables, xb), -1))
    for split, (x, y) in {"valid": (v_images, v_labels), "test": (test.images, test.labels)}.items():
        preds = np.concatenate([np.asarray(apply(jnp.asarray(x[s:s + 1000], jnp.float32)))
                                for s in range(0, len(y), 1000)])
        model_acc[split] = float(np.mean(preds == np.asarray(y)))
    per_class = []
    for c in range(num_classes):
        stats = extract.module_stats(graph, result.mask_of(c))
        per_class.append({"class": c, "name": class_names[c], **{k: D._py(v) for k, v in stats.items()}})

    def mean_of(key: str) -> float | None:
        vals = [p[key] for p in per_class if isinstance(p.get(key), (int, float))]
        return float(np.mean(vals)) if vals else None

    times = [h["time_s"] for h in history]
    summary = {
        "model": model_desc, "method": "gradient",
        "source_model": D.source_model_record(run_dir, fp["params"]["sha256"], train_cfg, classes,
                                              class_names),
        "gradient": jconfig.to_dict(gcfg), "seed": scfg.seed, "num_valid_images": int(num_valid),
        "num_train_images": int(num_train), "epochs_run": len(history),
        "num_epochs": gcfg.num_epochs, "best_epoch": result.best_epoch,
        # the GA summary's names, so format_summary and reports read both
        "best_generation": result.best_epoch, "generations_run": len(history),
        "ensemble_valid_accuracy": ens_valid, "ensemble_test_accuracy": ens_test,
        "ensemble_diff": ensemble_diff(result.masks),
        "model_valid_accuracy": model_acc["valid"], "model_test_accuracy": model_acc["test"],
        "test_accuracy_loss": model_acc["test"] - ens_test,
        "mean_kept_fraction": mean_of("kept_fraction"), "mean_params_fraction": mean_of("params_fraction"),
        "mean_macs_fraction": mean_of("macs_fraction"),
        "per_class": per_class, "repaired_empty_sites": repairs, "train_time_s": train_time,
        "mean_epoch_time_s": float(np.mean(times[1:] if len(times) > 1 else times)) if times else None,
    }
    D._save_json(out_dir / "history.json", {"epochs": history})
    D._save_json(out_dir / "summary.json", summary)
    D.log.info("%s", D.format_summary(summary))
    return summary


def load_modules(run_dir: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """`(masks {site: bool[C, K]}, head_params {dense_i: {kernel, bias}} with leading C)`."""
    out_dir = Path(run_dir) / D.MODULARIZE_DIRNAME
    with np.load(out_dir / "masks.npz") as f:
        masks = {k: f[k] for k in f.files}
    heads: dict[str, Any] = {}
    with np.load(out_dir / "heads.npz") as f:
        for k in f.files:
            node = heads
            *parents, leaf = k.split("/")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = f[k]
    return masks, heads
