"""PNG figures for run artifacts. Uses matplotlib's object API (no pyplot), so no global backend state."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure


def sample_grid(images: np.ndarray, labels: np.ndarray, class_names, per_class: int = 8) -> Figure:
    """One row per class, the first `per_class` images of each; images uint8 NCHW."""
    n_classes = len(class_names)
    fig = Figure(figsize=(per_class * 0.9 + 1.6, n_classes * 0.9), dpi=100)
    axes = fig.subplots(n_classes, per_class, squeeze=False)
    for c, name in enumerate(class_names):
        idx = np.flatnonzero(labels == c)[:per_class]
        for j in range(per_class):
            ax = axes[c, j]
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_frame_on(False)
            if j < len(idx):
                ax.imshow(images[idx[j]].transpose(1, 2, 0), interpolation="nearest")
        axes[c, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=9)
    fig.subplots_adjust(left=0.15, right=0.99, top=0.99, bottom=0.01, wspace=0.05, hspace=0.05)
    return fig


def confusion_matrix(confusion: np.ndarray, class_names) -> Figure:
    """Row-normalized (each row is one true class, sums to 1), with the counts' fractions printed."""
    rows = confusion / np.maximum(confusion.sum(1, keepdims=True), 1)
    fig = Figure(figsize=(7.5, 6.5), dpi=100)
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
    fig = Figure(figsize=(9, 3.6), dpi=100)
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
    fig = Figure(figsize=(8, 3.8), dpi=100)
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
    fig = Figure(figsize=(cols * 1.35, rows * 1.6 + 0.4), dpi=100)
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
