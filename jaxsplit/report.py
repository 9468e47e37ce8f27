"""One Markdown report of a run folder: training, modularization, patching.

`write_report(run_dir)` reads what the stages wrote (see the run folder layout below) and renders
every stage that has results into ``runs/NAME/report.md``; a stage that has not run is noted,
not an error. Images are linked by relative path, so the report renders in place (GitHub, VS
Code, any Markdown viewer).

    runs/NAME/config.yaml                     resolved config
    runs/NAME/metrics.json                    training metrics
    runs/NAME/modularize/summary.json         per-class modules, ensemble accuracy/diff
    runs/NAME/modularize/history.json         per-generation search curves
    runs/NAME/modularize/*.png                search plots
    runs/NAME/patch/patch_results.json        patching results (`jaxsplit.patch.run_patch`)
    runs/NAME/patch/*.png                     patching plots

The training and modularization files are rendered generically (scalars as key/value tables,
lists of records as tables, long series summarised), so this module does not depend on their
exact schema; the patching results have a dedicated layout. This is an I/O edge: it only reads
JSON/YAML and writes one file.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from jaxsplit.errors import JaxsplitError

__all__ = ["write_report", "render_report", "ReportError"]

MAX_ROWS = 20  # rows of a record table before it is cut
MAX_INLINE = 12  # a list of scalars longer than this is summarised
# bookkeeping keys of the stages' JSON that mean nothing to a reader of the report
HIDDEN_KEYS = frozenset({"stats_source", "class_names", "data"})


class ReportError(JaxsplitError, FileNotFoundError):
    """The run folder does not exist."""


# -- formatting helpers -----------------------------------------------------------------------


# the gradient searcher's settings a report names (docs/method.md §10)
GRADIENT_KEYS = ("alpha", "head", "init", "estimator", "head_epochs", "modular_epochs",
                 "cycle_mask_epochs", "cycle_head_epochs", "lr_modular", "lr_head", "batch_size")


def _is_scalar(x: Any) -> bool:
    return x is None or isinstance(x, (bool, int, float, str))


def _fmt(x: Any) -> str:
    if isinstance(x, bool) or x is None:
        return str(x)
    if isinstance(x, int):
        return f"{x:,}" if abs(x) >= 10_000 else str(x)
    if isinstance(x, float):
        if math.isnan(x) or math.isinf(x):
            return str(x)
        if x != 0 and (abs(x) >= 1e5 or abs(x) < 1e-3):
            return f"{x:.3e}"
        return f"{x:.4f}".rstrip("0").rstrip(".") if abs(x) < 1 else f"{x:.4g}"
    return str(x).replace("|", "\\|").replace("\n", " ")


def _pct(x: Any) -> str:
    return f"{100 * x:.2f}" if isinstance(x, (int, float)) and not isinstance(x, bool) else _fmt(x)


def _signed_pts(x: Any) -> str:
    return f"{100 * x:+.2f}" if isinstance(x, (int, float)) else _fmt(x)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(_fmt(h) for h in header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(c if isinstance(c, str) else _fmt(c) for c in row) + " |")
    return lines + [""]


def _series_summary(values: Sequence[Any]) -> str:
    nums = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if len(nums) == len(values) and nums:
        return (f"{len(values)} values: first {_fmt(nums[0])}, last {_fmt(nums[-1])}, "
                f"min {_fmt(min(nums))}, max {_fmt(max(nums))}")
    return f"{len(values)} values"


def _is_records(x: Any) -> bool:
    return bool(isinstance(x, list) and x and all(isinstance(r, Mapping) for r in x))


def _cell(v: Any) -> str:
    """A table cell: scalars as they are, a list of numbers as its mean, other values elided."""
    if _is_scalar(v):
        return _fmt(v)
    if isinstance(v, list) and v and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
        return f"mean {_fmt(sum(v) / len(v))}"
    return "…"


def _empty(v: Any) -> bool:
    return v is None or v == "" or (isinstance(v, (list, dict)) and not v)


def _render_records(records: list[Mapping], indent: str = "") -> list[str]:
    keys: list[str] = []
    for r in records:
        keys.extend(k for k in r if k not in keys and k not in HIDDEN_KEYS)
    keys = [k for k in keys if not all(_empty(r.get(k)) for r in records)]  # no empty columns
    rows = records if len(records) <= MAX_ROWS else records[: MAX_ROWS // 2] + records[-MAX_ROWS // 2:]
    lines = _table(keys, [[_cell(r.get(k, "")) for k in keys] for r in rows])
    if len(records) > MAX_ROWS:
        lines += [f"_({len(records)} rows; first and last {MAX_ROWS // 2} shown)_", ""]
    return lines


def _render_json(obj: Any, title: str, level: int = 3) -> list[str]:
    """Generic Markdown of a JSON value: scalars in a key/value table, nested values below."""
    heading = "#" * min(level, 6)
    lines: list[str] = []
    if isinstance(obj, Mapping):
        obj = {k: v for k, v in obj.items() if not _empty(v) and k not in HIDDEN_KEYS}
        scalars = [(k, v) for k, v in obj.items() if _is_scalar(v)]
        short_lists = [(k, v) for k, v in obj.items()
                       if isinstance(v, list) and all(_is_scalar(x) for x in v)]
        rows = [(k, _fmt(v)) for k, v in scalars]
        rows += [(k, ", ".join(_fmt(x) for x in v) if len(v) <= MAX_INLINE else _series_summary(v))
                 for k, v in short_lists]
        if rows:
            lines += _table(["key", "value"], rows)
        nested = [(k, v) for k, v in obj.items()
                  if not _is_scalar(v) and not (isinstance(v, list) and all(_is_scalar(x) for x in v))]
        for k, v in nested:
            if level >= 6:
                lines += [f"{heading} {title} / {k}", "", f"_({type(v).__name__} not shown)_", ""]
                continue
            lines += [f"{heading} {k}", ""]
            lines += _render_json(v, k, level + 1)
    elif _is_records(obj):
        lines += _render_records(obj)
    elif isinstance(obj, list):
        if all(_is_scalar(x) for x in obj):
            lines += [", ".join(_fmt(x) for x in obj) if len(obj) <= MAX_INLINE else _series_summary(obj), ""]
        else:
            lines += [f"_({len(obj)} items)_", ""]
    else:
        lines += [_fmt(obj), ""]
    return lines


def _read_json(path: Path) -> tuple[Any, str | None]:
    try:
        return json.loads(path.read_text()), None
    except (OSError, json.JSONDecodeError) as e:
        return None, f"could not read `{path.name}`: {e}"


def _images(folder: Path, run_dir: Path) -> list[str]:
    if not folder.is_dir():
        return []
    # the result as shipped (patch_final.png: the gated default method) before the comparisons
    pngs = sorted(folder.glob("*.png"), key=lambda p: (p.stem != "patch_final", p.name))
    return [f"![{p.stem}]({p.relative_to(run_dir).as_posix()})" + "\n" for p in pngs]


def _missing(what: str, path: str, command: str) -> list[str]:
    return [f"_Not run yet: no `{path}` ({what}; run `{command}`)._", ""]


# -- sections ---------------------------------------------------------------------------------


def _config_section(run_dir: Path) -> list[str]:
    path = run_dir / "config.yaml"
    lines = ["## Configuration", ""]
    if not path.is_file():
        return lines + ["_No `config.yaml` in the run folder._", ""]
    try:
        cfg = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        return lines + [f"_Could not read `config.yaml`: {e}_", ""]
    rows = []
    searched = _search_config(run_dir)  # what the search ran with (its --config / --set values)
    for section in ("data", "model", "train", "search", "patch"):
        sec = searched if section == "search" and searched is not None else cfg.get(section)
        label = "search (modularize/config.yaml)" if sec is searched else section
        if isinstance(sec, Mapping):
            keys = {"data": ("name", "source", "classes", "train_limit", "image_size"),
                    "model": ("name", "width"),
                    "train": ("optimizer", "learning_rate", "epochs", "batch_size"),
                    "search": ("strategy", "population_size", "num_generations", "ensemble", "method"),
                    "patch": ("task", "strong_classes", "weak_classes", "tc_train_images",
                              "weak_model", "weak_epochs", "calibrations")}[section]
            if section == "search" and sec.get("method") == "gradient":
                keys = ("method", "seed")
                grad = sec.get("gradient")
                sec = {**sec, **({f"gradient.{k}": v for k, v in grad.items() if k in GRADIENT_KEYS}
                                 if isinstance(grad, Mapping) else {})}
                keys += tuple(f"gradient.{k}" for k in GRADIENT_KEYS)
            val = ", ".join(f"{k}={_fmt(sec[k]) if _is_scalar(sec[k]) else sec[k]}" for k in keys if k in sec)
            rows.append((label, val))
    lines += _table(["section", "settings"], rows) if rows else []
    lines += ["Full resolved config: [`config.yaml`](config.yaml).", ""]
    return lines


def _search_config(run_dir: Path) -> Mapping | None:
    """The search section of ``modularize/config.yaml`` (the resolved config a search started
    with), or None when there is none or it is unreadable."""
    path = run_dir / "modularize" / "config.yaml"
    try:
        sec = (yaml.safe_load(path.read_text()) or {}).get("search") if path.is_file() else None
    except (OSError, yaml.YAMLError, AttributeError):
        return None
    return sec if isinstance(sec, Mapping) else None


def _training_section(run_dir: Path) -> list[str]:
    lines = ["## Training", ""]
    path = run_dir / "metrics.json"
    if not path.is_file():
        return lines + _missing("training metrics", "metrics.json", "jaxsplit train")
    data, err = _read_json(path)
    if err:
        return lines + [f"_{err}_", ""]
    lines += _render_json(data, "training", 3)
    lines += _images(run_dir, run_dir)
    return lines


def _modularize_section(run_dir: Path) -> list[str]:
    lines = ["## Modularization", ""]
    folder = run_dir / "modularize"
    summary, history = folder / "summary.json", folder / "history.json"
    if not summary.is_file() and not history.is_file():
        return lines + _missing("modularization results", "modularize/summary.json", "jaxsplit modularize")
    if summary.is_file():
        data, err = _read_json(summary)
        per_class = data.get("per_class") if isinstance(data, Mapping) else None
        if _is_records(per_class):
            lines += ["### Modules", ""] + _modules_table(per_class)
            lines += _sites_table(per_class, folder / "masks.npz")
            data = {k: v for k, v in data.items() if k != "per_class"}
        lines += ["### Summary", ""] + ([f"_{err}_", ""] if err else _render_json(data, "summary", 4))
    else:
        lines += ["_No `modularize/summary.json` yet (search not finished?)._", ""]
    if history.is_file():
        data, err = _read_json(history)
        lines += ["### Search history", ""]
        lines += [f"_{err}_", ""] if err else _render_json(data, "history", 4)
    lines += _images(folder, run_dir)
    return lines


def _modules_table(per_class: list[Mapping]) -> list[str]:
    """One row per class module: its size as % of the model (kernels, parameters, MACs)."""
    rows = []
    for r in per_class:
        name = r.get("name", r.get("class", "?"))
        kept = r.get("kept_kernels")
        rows.append([str(name), _fmt(kept) if kept is not None else "",
                     _pct(r.get("kept_fraction")), _pct(r.get("params_fraction")), _pct(r.get("macs_fraction"))])
    header = ["class", "kernels kept", "kernels %", "parameters %", "MACs %"]
    keep = [i for i in range(len(header)) if i == 0 or any(row[i] not in ("", "None") for row in rows)]
    return _table([header[i] for i in keep], [[row[i] for i in keep] for row in rows])


def _site_sizes(masks_path: Path) -> dict[str, int]:
    """Kernels per site `{site: K}` from ``masks.npz`` (arrays `(C, K)`), or {} if unreadable."""
    try:
        import numpy as np

        with np.load(masks_path, allow_pickle=False) as z:
            return {k: int(z[k].shape[-1]) for k in z.files if z[k].ndim == 2}
    except (OSError, ValueError, EOFError):
        return {}


def _sites_table(per_class: list[Mapping], masks_path: Path) -> list[str]:
    """Kernels each class module keeps per site (conv layer), in forward order: the sites are
    named by their parameter path (`conv_0` for a ConvNet, `stage1/block0/conv1` for a ResNet);
    sites tied by residual adds keep the same kernels."""
    layers = [r.get("kept_per_layer") for r in per_class]
    if not all(isinstance(d, Mapping) and d for d in layers):
        return []
    sites = list(layers[0])
    sizes = _site_sizes(masks_path)
    names = [str(r.get("name", r.get("class", "?"))) for r in per_class]
    header = ["site"] + (["kernels"] if sizes else []) + names + (["mean %"] if sizes else [])
    rows = []
    for site in sites:
        kept = [d.get(site) for d in layers]
        row = [_fmt(site)] + ([_fmt(sizes.get(site, ""))] if sizes else []) + [_fmt(k) for k in kept]
        if sizes:
            nums = [k for k in kept if isinstance(k, int)]
            k_total = sizes.get(site)
            row.append(_pct(sum(nums) / len(nums) / k_total) if nums and k_total else "")
        rows.append(row)
    note = ("Kernels each module keeps in each conv site (forward order; sites tied by a "
            "residual add keep the same kernels).")
    return ["#### Kernels kept per site", "", note, ""] + _table(header, rows)


def _metric_row(label: str, m: Mapping) -> list[str]:
    return [label, _pct(m.get("tc_precision")), _pct(m.get("tc_recall")), _pct(m.get("tc_f1")),
            _pct(m.get("non_tc_accuracy")), _pct(m.get("accuracy")), _fmt(m.get("tc_ece"))]


_METRIC_HEADER = ["", "TC precision %", "TC recall %", "TC F1 %", "non-TC acc %", "acc %", "TC ECE"]


def _patch_section(run_dir: Path) -> list[str]:
    lines = ["## Patching", ""]
    folder = run_dir / "patch"
    path = folder / "patch_results.json"
    if not path.is_file():
        return lines + _missing("patching results", "patch/patch_results.json", "jaxsplit patch")
    res, err = _read_json(path)
    if err or not isinstance(res, Mapping):
        return lines + [f"_{err or 'patch_results.json is not a JSON object'}_", ""]
    primary = res.get("primary_calibration")
    names = _tc_names(res, run_dir)
    lines += [f"Task: **{res.get('task', '?')}**. {res.get('protocol', '')}", ""]
    modules = res.get("modules")
    if isinstance(modules, Mapping):
        searcher = {"ga": "the genetic search", "gradient": "the gradient searcher"}.get(
            str(modules.get("searcher")), _fmt(modules.get("searcher")))
        made = (f"Modules: `{_fmt(modules.get('file', 'modularize/modules.npz'))}`, made by {searcher} "
                f"(searcher `{_fmt(modules.get('searcher'))}`).")
        lines += [made, ""]
    weak = res.get("weak_model")
    if isinstance(weak, Mapping):
        lines += ["Weak model: " + ", ".join(f"{k}={_fmt(v)}" for k, v in weak.items() if _is_scalar(v)), ""]
    avg = res.get("average", {})
    if isinstance(avg, Mapping) and avg:
        lines += [f"### Averages over {len(res.get('target_classes', []))} target classes (test split)", ""]
        rows = [_metric_row("weak model", avg.get("before", {}))]
        for name, m in avg.get("module_patch", {}).items():
            rows.append(_metric_row(f"patched, module, {name}" + (" (primary)" if name == primary else ""), m))
        for name, m in avg.get("whole_model_patch", {}).items():
            rows.append(_metric_row(f"patched, whole strong model, {name}", m))
        lines += _table(_METRIC_HEADER, rows)
    acc = res.get("acceptance")
    if isinstance(acc, Mapping):
        verdict = "PASSED" if acc.get("passed") else "NOT passed"
        lines += [f"**Acceptance** ({_fmt(acc.get('criterion', ''))}), calibration `{acc.get('calibration')}`: "
                  f"TC precision {_signed_pts(acc.get('delta_tc_precision'))} pts, "
                  f"TC recall {_signed_pts(acc.get('delta_tc_recall'))} pts, "
                  f"non-TC accuracy {_signed_pts(acc.get('delta_non_tc_accuracy'))} pts: **{verdict}**.", ""]
    per_tc = res.get("per_tc", {})
    if isinstance(per_tc, Mapping) and per_tc:
        lines += [f"### Per target class (primary calibration `{primary}`)", ""]
        rows = []
        for tc, r in per_tc.items():
            b = r.get("before", {})
            a = r.get("module_patch", {}).get(primary, {})
            w = r.get("whole_model_patch", {}).get(primary, {})
            size = r.get("module", {})
            rows.append([names.get(str(tc), str(tc)), _pct(b.get("tc_precision")), _pct(a.get("tc_precision")),
                         _pct(b.get("tc_recall")), _pct(a.get("tc_recall")),
                         _pct(b.get("non_tc_accuracy")), _pct(a.get("non_tc_accuracy")),
                         _pct(w.get("tc_f1")), _pct(a.get("tc_f1")),
                         _pct(size.get("macs_fraction")), _pct(size.get("params_fraction"))])
        lines += _table(["target class", "prec before", "prec after", "recall before", "recall after",
                         "non-TC before", "non-TC after", "F1 whole model", "F1 module",
                         "module MACs %", "module params %"], rows)
        poor = [(tc, r["poor_fit"]) for tc, r in per_tc.items() if isinstance(r.get("poor_fit"), Mapping)]
        if poor:
            lines += ["### Poor-fit weak models", ""]
            rows = []
            for tc, pf in poor:
                for kind, r in pf.items():
                    b = r.get("before", {})
                    a = r.get("module_patch", {}).get(primary, {})
                    rows.append([f"{names.get(str(tc), str(tc))}, {kind}", _pct(b.get("tc_precision")),
                                 _pct(a.get("tc_precision")),
                                 _pct(b.get("tc_recall")), _pct(a.get("tc_recall")),
                                 _pct(b.get("non_tc_accuracy")), _pct(a.get("non_tc_accuracy"))])
            lines += _table(["target class, weak model", "prec before", "prec after", "recall before", "recall after",
                             "non-TC before", "non-TC after"], rows)
    lines += _images(folder, run_dir)
    lines += ["Full results: [`patch/patch_results.json`](patch/patch_results.json).", ""]
    return lines


# -- summary ----------------------------------------------------------------------------------


def _load(path: Path) -> Any:
    if not path.is_file():
        return None
    data, err = _read_json(path)
    return None if err else data


def _dataset_name(run_dir: Path, patch: Any) -> str | None:
    try:
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
        name = (cfg.get("data") or {}).get("name")
        if name:
            return str(name)
    except (OSError, yaml.YAMLError, AttributeError):
        pass
    return patch.get("dataset") if isinstance(patch, Mapping) else None


FAMILY_TITLES = {"simcnn": "SimCNN", "rescnn": "ResCNN", "weak_cnn": "weak CNN"}
DATASET_TITLES = {"fashion_mnist": "Fashion-MNIST", "mnist": "MNIST", "cifar10": "CIFAR-10",
                  "cifar100": "CIFAR-100", "svhn": "SVHN", "svhn_cropped": "SVHN"}


def _tc_names(res: Mapping, run_dir: Path) -> dict[str, str]:
    """`{per_tc key: class name}` of a patching result (dataset class ids -> names)."""
    from jaxsplit.data.names import class_names

    dataset = res.get("dataset") or _dataset_name(run_dir, res)
    out = {}
    for tc in res.get("per_tc", {}) or {}:
        try:
            out[str(tc)] = class_names(dataset, (int(tc),))[0]
        except (ValueError, TypeError):
            out[str(tc)] = str(tc)
    return out


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def _count(x: Any) -> str:
    return f"{x:,}" if isinstance(x, int) and not isinstance(x, bool) else "?"


def _arrow(before: Any, after: Any) -> str:
    b, a = _num(before), _num(after)
    if b is None or a is None:
        return "n/a"
    return f"{100 * b:.2f}% → {100 * a:.2f}% ({_minus(100 * (a - b))} points)"


def _minus(x: float) -> str:
    """A signed number with a real minus sign: +1.20, −0.40."""
    return f"{x:+.2f}".replace("-", "−")


def _summary_section(run_dir: Path) -> list[str]:
    """What ran, the headline figures and a plain verdict, from whatever stages have results."""
    metrics = _load(run_dir / "metrics.json")
    summary = _load(run_dir / "modularize" / "summary.json")
    patch = _load(run_dir / "patch" / "patch_results.json")
    metrics = metrics if isinstance(metrics, Mapping) else {}
    summary = summary if isinstance(summary, Mapping) else {}
    patch = patch if isinstance(patch, Mapping) else {}
    if not (metrics or summary or patch):
        return ["## Summary", "", "_No stage has results yet._", ""]
    dataset = _dataset_name(run_dir, patch)
    title = DATASET_TITLES.get(str(dataset), str(dataset)) if dataset else "the dataset"
    lines = ["## Summary", ""]

    ran = []
    model = metrics.get("model") if isinstance(metrics.get("model"), Mapping) else {}
    if metrics:
        family = model.get("family", "the model")
        width = f" (width {_fmt(model['width'])})" if "width" in model else ""
        size = f", {metrics['num_params']:,} parameters" if isinstance(metrics.get("num_params"), int) else ""
        family = FAMILY_TITLES.get(str(family), str(family))
        ran.append(f"**training**: {family}{width}{size}, trained on {title}"
                   + (f" ({metrics['num_classes']} classes, {metrics['num_train']:,} training images)"
                      if isinstance(metrics.get("num_classes"), int) and isinstance(metrics.get("num_train"), int)
                      else ""))
    if summary and summary.get("method") == "gradient":
        grad = summary.get("gradient") if isinstance(summary.get("gradient"), Mapping) else {}
        settings = ", ".join(f"{k}={_fmt(grad[k])}" for k in GRADIENT_KEYS if k in grad)
        ran.append(f"**modularization**: one module per class, found by the gradient searcher "
                   f"(`search.method=gradient`: per-class kernel masks and module heads trained by "
                   f"gradient descent, model weights frozen; {_count(summary.get('epochs_run'))} of "
                   f"{_count(summary.get('num_epochs'))} epochs on "
                   f"{_count(summary.get('num_train_images'))} training images, best epoch "
                   f"{summary.get('best_epoch', '?')} chosen on "
                   f"{_count(summary.get('num_valid_images'))} validation images"
                   + (f"; {settings}" if settings else "") + ")")
    elif summary:
        gens = summary.get("generations_run")
        ran.append(f"**modularization**: one module per class, found by the GA searcher "
                   f"(`search.method=ga`): the `{summary.get('strategy', '?')}` "
                   f"search ({summary.get('population_size', '?')} individuals per class, {gens} generations, "
                   f"{_count(summary.get('num_valid_images'))} validation images as the search set)")
    names = _tc_names(patch, run_dir) if patch else {}
    if patch:
        ran.append(f"**patching**: task `{patch.get('task', '?')}`; for each target class (TC) — "
                   f"{', '.join(names.values())} — a weak model trained with that class last is patched "
                   f"with the class's module (calibration `{patch.get('primary_calibration', '?')}`), "
                   f"measured on the test split")
    lines += ["What ran:", ""] + [f"- {r}" for r in ran] + [""]

    rows: list[tuple[str, str]] = []
    verdict: list[str] = []
    model_test = _num(summary.get("model_test_accuracy")) or _num(metrics.get("test_accuracy"))
    if model_test is not None:
        rows.append(("model, test accuracy", f"{100 * model_test:.2f}%"))
    ens_test, ens_search = _num(summary.get("ensemble_test_accuracy")), _num(summary.get("ensemble_valid_accuracy"))
    if ens_test is not None:
        loss = None if model_test is None else model_test - ens_test
        rows.append(("module ensemble, test accuracy", f"{100 * ens_test:.2f}%"
                     + ("" if loss is None else f" ({_minus(-100 * loss)} points against the model)")))
        if loss is not None:
            verdict.append(
                f"Used together, the modules classify the test set {100 * loss:.2f} points "
                f"{'worse' if loss >= 0 else 'better'} than the model"
                + (" — within the reference's loss of about 2.9 points." if loss <= 0.03 else
                   " — more than the reference's loss of about 2.9 points (a small search budget costs accuracy)."))
    if ens_search is not None:
        gap = None if ens_test is None else ens_search - ens_test
        rows.append(("module ensemble, search-set accuracy", f"{100 * ens_search:.2f}%"
                     + ("" if gap is None else f" ({100 * gap:.2f} points {'above' if gap >= 0 else 'below'} "
                                             f"the test accuracy)")))
        if gap is not None and gap > 0.01:
            verdict.append(f"The search-set accuracy is {100 * gap:.2f} points above the test accuracy: the GA "
                           f"chose the modules on those images, so the test figure is the one to trust.")
    kept = [(summary.get(k), w) for k, w in (("mean_kept_fraction", "kernels"),
                                              ("mean_params_fraction", "parameters"),
                                              ("mean_macs_fraction", "MACs"))]
    kept = [f"{100 * v:.1f}% of the {w}" for v, w in kept if _num(v) is not None]
    if kept:
        rows.append(("a module keeps (mean over classes)", ", ".join(kept)))
    if _num(summary.get("ensemble_diff")) is not None:
        rows.append(("ensemble difference (1 − Jaccard)", f"{100 * summary['ensemble_diff']:.2f}%"))

    avg = patch.get("average") if isinstance(patch.get("average"), Mapping) else {}
    primary = patch.get("primary_calibration")
    if avg:
        before = avg.get("before", {}) or {}
        after = (avg.get("module_patch", {}) or {}).get(primary, {}) or {}
        n = len(patch.get("per_tc", {}) or {})
        for key, label in (("tc_precision", "TC precision"), ("tc_recall", "TC recall"),
                           ("non_tc_accuracy", "non-TC accuracy")):
            rows.append((f"{label}, mean over {n} target classes", _arrow(before.get(key), after.get(key))))
    per_tc = patch.get("per_tc") if isinstance(patch.get("per_tc"), Mapping) else {}
    if per_tc:
        both = []
        for tc, r in per_tc.items():
            b = r.get("before", {}) or {}
            a = (r.get("module_patch", {}) or {}).get(primary, {}) or {}
            dp = (_num(a.get("tc_precision")) or 0.0) - (_num(b.get("tc_precision")) or 0.0)
            dr = (_num(a.get("tc_recall")) or 0.0) - (_num(b.get("tc_recall")) or 0.0)
            if dp > 0 and dr > 0:
                both.append(names.get(str(tc), str(tc)))
        rows.append(("target classes improved on both precision and recall",
                     f"{len(both)} of {len(per_tc)}" + (f" ({', '.join(both)})" if both else "")))
        acc = patch.get("acceptance") if isinstance(patch.get("acceptance"), Mapping) else {}
        if acc:
            passed = bool(acc.get("passed"))
            verdict.append(
                f"Patching {'meets' if passed else 'does not meet'} its acceptance criterion "
                f"({acc.get('criterion', '?')}): on average TC precision "
                f"{_signed_pts(acc.get('delta_tc_precision'))}, TC recall {_signed_pts(acc.get('delta_tc_recall'))} "
                f"and non-TC accuracy {_signed_pts(acc.get('delta_non_tc_accuracy'))} points. "
                + _both_sentence(len(both), len(per_tc)))
    gated = patch.get("summary") if isinstance(patch.get("summary"), Mapping) else {}
    gated_rows: list[tuple[str, ...]] = []
    if gated.get("per_tc"):
        method = gated.get("method", "?")
        avg = ((gated.get("average") or {}).get("test") or {})
        before, final = avg.get("before") or {}, avg.get("final") or {}
        for key, label in (("tc_f1", "TC F1"), ("non_tc_accuracy", "non-TC accuracy")):
            rows.append((f"{label} with the validation gate (`{method}`), mean", _arrow(before.get(key), final.get(key))))
        rows.append(("patches kept by the validation gate",
                     f"{gated.get('num_accepted', '?')} of {gated.get('num_tcs', '?')}"))
        verdict.append(
            f"Behind the validation gate (decided on the weak task's valid split only), "
            f"{gated.get('num_accepted', '?')} of {gated.get('num_tcs', '?')} patches were kept; "
            f"{gated.get('num_improved_both', '?')} target classes improved on both precision and recall "
            f"and {gated.get('num_worse', '?')} got worse on TC F1 (test split).")
        for r in gated["per_tc"]:
            t = r.get("test") or {}
            b, f = t.get("before") or {}, t.get("final") or {}
            gated_rows.append((
                str(r.get("class_name", r.get("target_class"))),
                "kept" if r.get("accepted") else "rejected",
                _arrow(b.get("tc_precision"), f.get("tc_precision")),
                _arrow(b.get("tc_recall"), f.get("tc_recall")),
                _arrow(b.get("tc_f1"), f.get("tc_f1")),
                _arrow(b.get("non_tc_accuracy"), f.get("non_tc_accuracy")),
                str(r.get("reason", "")).replace("|", "/")))
    if rows:
        lines += _table(["headline", "value"], rows)
    if verdict:
        lines += ["**Verdict.** " + " ".join(verdict), ""]
    if gated_rows:
        lines += ["Per target class, behind the validation gate (test split, weak → final model):", ""]
        lines += _table(["target class", "patch", "TC precision", "TC recall", "TC F1",
                         "non-TC accuracy", "decided on valid"], gated_rows)
    return lines


def _both_sentence(both: int, total: int) -> str:
    if both == total:
        return f"All {total} target classes gain on both precision and recall."
    if both == 0:
        return ("No single target class gains on both precision and recall: each one trades one for the "
                "other, so the average gain is a mix of trade-offs, not a uniform improvement.")
    return (f"{both} of {total} target classes gain on both precision and recall; the others trade one "
            f"for the other.")


def _data_section(run_dir: Path) -> list[str]:
    """The data the model was trained on (metrics.json `data`: source, path, checksums), if recorded."""
    metrics = _load(run_dir / "metrics.json")
    data = metrics.get("data") if isinstance(metrics, Mapping) else None
    if not isinstance(data, Mapping) or not data:
        return []
    lines = ["## Data", ""]
    rows = [(k, _fmt(v)) for k, v in data.items() if _is_scalar(v) and not _empty(v)]
    rows += [(k, ", ".join(_fmt(x) for x in v)) for k, v in data.items()
             if isinstance(v, list) and v and all(_is_scalar(x) for x in v)]
    if rows:
        lines += _table(["", "value"], rows)
    files = [(split, f) for split, entry in (data.get("splits") or {}).items() if isinstance(entry, Mapping)
             for f in entry.get("files") or () if isinstance(f, Mapping)]
    if files:  # the files each split was read from, with their SHA-256 (metrics.json data.splits)
        lines += ["files:", ""] + _table(["split", "file", "bytes", "SHA-256"], [
            (split, f"`{f.get('path')}`", f"{f['bytes']:,}" if isinstance(f.get("bytes"), int) else "?", f"`{f.get('sha256')}`") for split, f in files])
    for k, v in data.items():
        if isinstance(v, Mapping) and v and k != "splits":
            flat = [(name, val) for name, val in v.items() if _is_scalar(val)]
            if flat:
                lines += [f"{k}:", ""] + _table(["file" if "checksum" in k or "sha" in k else "key", "value"],
                                                [(str(a), f"`{b}`" if isinstance(b, str) else _fmt(b))
                                                 for a, b in flat])
    return lines


# -- entry points -----------------------------------------------------------------------------


def render_report(run_dir: str | Path) -> str:
    """The Markdown text of the report of ``run_dir`` (see `write_report`)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"run folder {str(run_dir)!r} does not exist")
    lines = [f"# jaxsplit report: {run_dir.name}", ""]
    for section in (_summary_section, _data_section, _config_section, _training_section,
                    _modularize_section, _patch_section):
        lines += section(run_dir)
    return "\n".join(lines).rstrip() + "\n"


def write_report(run_dir: str | Path) -> Path:
    """Renders every stage's results found in ``run_dir`` into ``run_dir/report.md``.

    Args:
      run_dir: a run folder (``runs/NAME``).

    Returns:
      The path of the written report.

    Raises:
      ReportError: ``run_dir`` does not exist.
    """
    run_dir = Path(run_dir)
    text = render_report(run_dir)
    out = run_dir / "report.md"
    from jaxsplit.io import atomic_write_text

    atomic_write_text(out, text)  # a full disk never leaves a truncated report
    return out
