# ActivityNet, ResNet-50 features (30 x 2048); separate database and query files.
_base_ = "../_base_/s5vh.py"

dataset = "act"
feature_size = 2048
max_frames = 30
data = dict(
    protocol="separate",
    train_feats="train_feats.h5",
    train_labels="",
    db_feats="test_feats.h5",
    db_labels="re_label.mat",
    db_label_key="re_label",
    query_feats="query_feats.h5",
    query_labels="q_label.mat",
    query_label_key="q_label",
)
preprocess = dict(nclusters=100)
train = dict(alpha=0.2, tau_plus=0.05, a_cluster=0.001)
