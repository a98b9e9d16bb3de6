"""PNG figures for run artifacts. Uses matplotlib's object API (no pyplot), so no global backend state,
imported only when a figure is drawn (its import costs every process that would not draw one)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _figure(**kwargs) -> Figure:
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def mosaic(images: np.ndarray, rows: int, cols: int, gap: int = 2) -> np.ndarray:
    """uint8 NCHW images laid out row by row into one white-gapped HWC picture (missing cells stay white):
    one imshow instead of a subplot per image, which matplotlib draws several times slower."""
    _, c, h, w = images.shape
    out = np.full((rows * (h + gap) - gap, cols * (w + gap) - gap, c), 255, dtype=np.uint8)
    for k, image in enumerate(images[: rows * cols]):
        r, col = divmod(k, cols)
        out[r * (h + gap) : r * (h + gap) + h, col * (w + gap) : col * (w + gap) + w] = image.transpose(1, 2, 0)
    return out


def sample_grid(images: np.ndarray, labels: np.ndarray, class_names, per_class: int = 8, scale: int = 3):
    """One row per class, the first `per_class` images of each enlarged `scale` times, the class name
    on the left; images uint8 NCHW. A Pillow image, so ingest needs no matplotlib (docs/performance.md)."""
    from PIL import Image, ImageDraw, ImageFont

    n_classes = len(class_names)
    cells = np.full((n_classes * per_class, *images.shape[1:]), 255, dtype=np.uint8)
    for c in range(n_classes):
        idx = np.flatnonzero(labels == c)[:per_class]
        cells[c * per_class : c * per_class + len(idx)] = images[idx]
    grid = Image.fromarray(mosaic(cells, n_classes, per_class))
    grid = grid.resize((grid.width * scale, grid.height * scale), Image.Resampling.NEAREST)
    font = ImageFont.load_default(size=5 * scale)
    margin = int(max(font.getlength(name) for name in class_names)) + 4 * scale
    out = Image.new("RGB", (grid.width + margin, grid.height), "white")
    out.paste(grid, (margin, 0))
    draw = ImageDraw.Draw(out)
    row = (images.shape[2] + 2) * scale  # a cell and its gap
    for c, name in enumerate(class_names):
        draw.text((margin - 2 * scale, c * row + row // 2), name, fill="black", font=font, anchor="rm")
    return out


def confusion_matrix(confusion: np.ndarray, class_names) -> Figure:
    """Row-normalized (each row is one true class, sums to 1), with the counts' fractions printed."""
    rows = confusion / np.maximum(confusion.sum(1, keepdims=True), 1)
    fig = _figure(figsize=(7.5, 6.5), dpi=100)
    ax = fig.subplots()
    im = ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    ticks = np.arange(len(class_names))
    ax.set_xticks(ticks, class_names, rotation=45, ha="right")
    ax.set_yticks(ticks, class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in ticks:
        for j in ticks:
            ax.text(j, i, f"{rows[i, j]:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if rows[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    acc = confusion.diagonal().sum() / max(confusion.sum(), 1)
    ax.set_title(f"confusion matrix (rows normalized), accuracy {acc:.2%}")
    fig.tight_layout()
    return fig


def training_curves(history) -> Figure:
    """Loss and accuracy per epoch from a list of training.EpochResult."""
    epochs = [h.epoch for h in history]
    fig = _figure(figsize=(9, 3.6), dpi=100)
    loss_ax, acc_ax = fig.subplots(1, 2)
    loss_ax.plot(epochs, [h.loss for h in history], marker="o")
    loss_ax.set_title("training loss (cross-entropy)")
    acc_ax.plot(epochs, [100 * h.accuracy for h in history], marker="o", color="tab:green")
    acc_ax.set_title("training accuracy (%)")
    for ax in (loss_ax, acc_ax):
        ax.set_xlabel("epoch")
        ax.set_xticks(epochs)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def per_class_accuracy(class_names, accuracies, overall: float) -> Figure:
    fig = _figure(figsize=(8, 3.8), dpi=100)
    ax = fig.subplots()
    values = [100 * a for a in accuracies]
    bars = ax.bar(range(len(class_names)), values, color="tab:blue")
    ax.axhline(100 * overall, color="tab:red", linestyle="--", label=f"overall {overall:.1%}")
    ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.set_xticks(range(len(class_names)), class_names, rotation=30, ha="right")
    ax.set_ylim(0, 105)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("accuracy per class")
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig


def confident_mistakes(images, labels, probabilities, class_names, count: int = 24) -> Figure:
    """The `count` wrong predictions the model was surest of; images uint8 NCHW, probabilities [N, C]."""
    predicted = probabilities.argmax(1)
    wrong = np.flatnonzero(predicted != labels)
    worst = wrong[np.argsort(-probabilities[wrong, predicted[wrong]])][:count]
    cols = 8
    rows = max(1, -(-len(worst) // cols))
    fig = _figure(figsize=(cols * 1.35, rows * 1.6 + 0.4), dpi=100)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, i in zip(axes.flat, worst, strict=False):
        ax.imshow(images[i].transpose(1, 2, 0), interpolation="nearest")
        guess = f"{class_names[predicted[i]]} {probabilities[i, predicted[i]]:.0%}"
        ax.set_title(f"{guess}\ntrue: {class_names[labels[i]]}", fontsize=7, color="tab:red")
    fig.suptitle("most confident mistakes (predicted, confidence / true class)", fontsize=10)
    fig.tight_layout()
    return fig


def study_figures(study) -> dict[str, Figure]:
    """Optuna's own pictures of a study: the best value over the trials, which parameters mattered (once two
    trials have finished), and every trial's parameters against its value."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    from optuna.visualization import matplotlib as views

    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    figures = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna marks its matplotlib views experimental, on every call
        figures["optimization_history"] = views.plot_optimization_history(study).figure
        if len(complete) >= 2:
            figures["param_importances"] = views.plot_param_importances(study).figure
        figures["parallel_coordinate"] = views.plot_parallel_coordinate(study).figure
    for figure in figures.values():
        figure.set_size_inches(9, 5)
        figure.tight_layout()
    return figures
