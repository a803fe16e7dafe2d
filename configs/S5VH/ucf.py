# UCF101, VGG features (25 x 4096); database = training split, queries = test split.
_base_ = "../_base_/s5vh.py"

dataset = "ucf"
data = dict(
    train_feats="ucf_train_feats.h5",
    train_labels="ucf_train_labels.mat",
    query_feats="ucf_test_feats.h5",
    query_labels="ucf_test_labels.mat",
)
preprocess = dict(nclusters=101)
