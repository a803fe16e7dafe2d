"""Every figure, rendered on tiny data: its labelled elements (axis labels, legend entries, panel
titles, the notes) checked through matplotlib's objects."""
import numpy as np
import pytest

from tools import benchmark, paper


def legend_texts(ax):
    legend = ax.get_legend()
    return [t.get_text() for t in legend.get_texts()] if legend else []


def title_of(fig):
    return fig._suptitle.get_text()


def test_convergence_figure():
    curves = {name: {"label": label, "epochs": [10, 20, 30],
                     "mAP": {k: [0.5, 0.4, 0.3] for k in paper.CONVERGENCE_K}}
              for name, label in (("with_ca", "with L_CA"), ("without_ca", "without L_CA"))}
    fig = paper.convergence_figure(curves, "Convergence: demo, 64 bits, selection: last, seed 1")
    assert [ax.get_ylabel() for ax in fig.axes] == ["test mAP@5", "test mAP@20", "test mAP@100"]
    for ax in fig.axes:
        assert ax.get_xlabel() == "epoch" and legend_texts(ax) == ["with L_CA", "without L_CA"]
        ticks = [t for t in ax.get_xticks() if 10 <= t <= 30]
        assert all(float(t).is_integer() for t in ticks)            # whole epochs only
    assert "seed 1" in title_of(fig) and "[1]" not in title_of(fig)


def test_curves_figure_explains_the_drop_at_recall_one():
    curve = {"N": [5, 10], "mAP": [0.5, 0.4], "precision": [0.9, 0.5, 0.2],
             "recall": [0.1, 0.5, 1.0]}
    fig = paper.curves_figure({"S5VH": curve, "ITQ": curve}, "Test retrieval: demo, 16 bits")
    left, right = fig.axes
    assert left.get_xlabel() == "N (videos retrieved)" and left.get_ylabel() == "test mAP@N"
    assert right.get_ylabel() == "precision" and "recall" in right.get_xlabel()
    assert legend_texts(left) == legend_texts(right) == ["S5VH", "ITQ"]
    notes = [t.get_text() for t in right.texts]
    assert any("radius B retrieves the whole database" in n for n in notes)


def test_tsne_figure_has_a_legend_on_every_panel_and_counts_identical_codes():
    rng = np.random.default_rng(0)
    codes = np.where(rng.random((12, 8)) < 0.5, -1.0, 1.0)
    codes[5:9] = codes[4]                                  # five queries share one code
    embedded = rng.normal(size=(12, 2))
    classes = np.arange(12) % 3
    fig = paper.tsne_figure({"S5VH": (embedded, codes), "ITQ": (embedded, codes[::-1])},
                            classes, "t-SNE: demo, 16 bits, selection: last, seed 1")
    for ax, method in zip(fig.axes, ("S5VH", "ITQ")):
        assert legend_texts(ax) == ["class 0", "class 1", "class 2"]
        assert ax.get_title() == f"{method}: 8 distinct codes of 12 queries"
        sizes = np.concatenate([c.get_sizes() for c in ax.collections])
        assert sizes.max() == 8 * 5                          # the shared code's marker
    assert "area grows with the number of queries" in title_of(fig)


def test_sweep_figure():
    point = lambda a, b: {"train.a_cluster": a, "train.smoothing_beta": b}  # noqa: E731
    rows = [{"point": point(a, b), "val_selected": {k: (0.5, 0.01) for k in paper.SWEEP_K},
             "epochs": [10, 20], "val_curve": {k: [0.5, 0.4] for k in paper.SWEEP_K},
             "label_changed": [0.0, 0.1], "label_entropy": [0.0, 0.2]}
            for a in (0.1, 1.0) for b in (0.0, 0.01)]
    fig = paper.sweep_figure({"train.a_cluster": [0.1, 1.0], "train.smoothing_beta": [0.0, 0.01]},
                             rows, rows[1], rows[2], "Sweep on demo, 64 bits, seeds [1, 2]")
    top = fig.axes[:2]
    assert [ax.get_title() for ax in top] == ["against train.a_cluster",
                                              "against train.smoothing_beta"]
    assert "mAP@100, smoothing_beta=0.0" in legend_texts(top[0])
    curve_ax, drift_ax = fig.axes[2:4]
    assert curve_ax.get_title() == "validation mAP over training"
    assert any(t.startswith("default (a_cluster=0.1, smoothing_beta=0.01) mAP@100")
               for t in legend_texts(curve_ax))
    assert drift_ax.get_title() == "label-table drift"
    assert "chosen: share of changed labels" in legend_texts(drift_ax)


def test_frames_figure_says_where_explicit_attention_ran_out_of_memory():
    rows = [{"encoder": name, "frames": m, "batch": 4, "ms": 1.0 * m, "peak_mib": 2.0 * m}
            for name, _ in benchmark.ENCODERS for m in (25, 100)]
    rows.append({"encoder": "transformer (explicit)", "frames": 400, "batch": 4, "ms": None,
                 "peak_mib": None, "oom": True})
    fig = benchmark.frames_figure({"device": "NVIDIA H200", "frames": rows})
    time_ax, memory_ax = fig.axes[:2]
    assert time_ax.get_ylabel() == "inference time per batch (ms)"
    assert memory_ax.get_ylabel() == "peak GPU memory (MiB)"
    for ax in (time_ax, memory_ax):
        assert ax.get_xlabel() == "frames per video (M)"
        assert "transformer (explicit): out of GPU memory at M = 400" in legend_texts(ax)
    assert "batch 4 videos" in title_of(fig) and "a point is" in title_of(fig)


@pytest.fixture(autouse=True)
def close_figures():
    yield
    import matplotlib.pyplot as plt
    plt.close("all")
