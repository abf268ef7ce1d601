"""Look at a trained run: metrics, every tutorial plot, and one HTML report.

Typical use::

    from cnnlab.analysis import analyze, plot_filters, save_figure, write_report
    a = analyze("runs/lenet5-mnist")                 # loads the newest checkpoint, evaluates the test split
    print(a.metrics.accuracy, a.metrics.most_confused[:3])
    save_figure(plot_filters(a.model, layer=0, channel=0), "filters.png")
    write_report(a)                                  # runs/lenet5-mnist/report.html
"""

from .analyze import PLOT_KINDS, Analysis, PlotOptions, analyze
from .layers import FilterStats, conv_layers, describe_layers, feature_modules, filter_weights, layer_output
from .metrics import (
    ClassMetrics,
    ConfusedPair,
    Metrics,
    TopLoss,
    compute_metrics,
    confusion_matrix,
    format_confusion,
    format_per_class,
    most_confused,
    per_class_metrics,
    top_k_accuracy,
    top_losses,
)
from .plots import (
    plot_activations,
    plot_augmentations,
    plot_confusion,
    plot_curves,
    plot_filters,
    plot_image_grid,
    plot_misclassified,
    plot_predictions,
    plot_probabilities,
    plot_samples,
    png_bytes,
    save_figure,
)
from .report import SECTIONS, render_report, write_report

__all__ = ["PLOT_KINDS", "SECTIONS", "Analysis", "ClassMetrics", "ConfusedPair", "FilterStats", "Metrics",
           "PlotOptions", "TopLoss", "analyze", "compute_metrics", "confusion_matrix", "conv_layers",
           "describe_layers", "feature_modules", "filter_weights", "format_confusion", "format_per_class",
           "layer_output", "most_confused", "per_class_metrics", "plot_activations", "plot_augmentations",
           "plot_confusion", "plot_curves", "plot_filters", "plot_image_grid", "plot_misclassified",
           "plot_predictions", "plot_probabilities", "plot_samples", "png_bytes", "render_report", "save_figure",
           "top_k_accuracy", "top_losses", "write_report"]
