# Opt-in recipe for deep ranks that hold (docs/method.md §11): the center-alignment weight ten
# times the default and label smoothing off. Chosen on ucf_dev by validation mAP alone (the
# mean of val mAP@5/20/100 at the selected epoch, seeds 1-3) over train.a_cluster x
# train.smoothing_beta and train.negatives (python -m tools.paper sweep; the commands in README
# "Deep ranks", results in tools/results/sweep_ucf_dev/ and sweep_negatives_ucf_dev/). It
# inherits ucf_dev; on another data set the same two keys give the recipe:
# --cfg-options train.a_cluster=1.0 train.smoothing_beta=0.0
_base_ = "../ucf_dev.py"

train = dict(a_cluster=1.0, smoothing_beta=0.0)
