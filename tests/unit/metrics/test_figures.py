"""The confusion matrix TensorBoard shows: class names on both axes, the count in every cell."""

from mmtrain.metrics.figures import confusion_figure, figure_image


def test_confusion_figure_names_the_classes_and_counts_each_cell():
    labels = ["refund", "logistics", "invoice"]
    gold, pred = [0, 1, 2, 2, 1, 1], [0, 1, 1, 2, 0, 1]
    ax = confusion_figure(pred, gold, labels, "intent").axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == labels
    assert [t.get_text() for t in ax.get_yticklabels()] == labels
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("predicted", "gold")
    cells = [int(t.get_text()) for t in ax.texts]  # row by row: gold, then predicted
    assert cells == [1, 0, 0, 1, 2, 0, 0, 1, 1]


def test_the_figure_becomes_an_rgb_image_in_0_1():
    img = figure_image(confusion_figure([0, 1], [0, 1], ["a", "b"], "t"))
    assert img.shape[0] == 3 and img.shape[1] > 100 and img.shape[2] > 100
    assert 0.0 <= float(img.min()) and float(img.max()) <= 1.0
