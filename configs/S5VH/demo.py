# Built-in synthetic demo (20 classes, 25 frames x 512-d); written to <data_root>/demo/ on first use.
_base_ = "../_base_/s5vh.py"

dataset = "demo"
feature_size = 512
data = dict(
    train_feats="demo_train_feats.h5",
    train_labels="demo_train_labels.mat",
    query_feats="demo_test_feats.h5",
    query_labels="demo_test_labels.mat",
)
preprocess = dict(latent_dim_pca=128, nclusters=20)
