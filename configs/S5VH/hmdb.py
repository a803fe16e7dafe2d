# HMDB51, VGG features (25 x 4096); database = training split, queries = test split.
_base_ = "../_base_/s5vh.py"

dataset = "hmdb"
data = dict(
    train_feats="hmdb_train_feats.h5",
    train_labels="hmdb_train_labels.mat",
    query_feats="hmdb_test_feats.h5",
    query_labels="hmdb_test_labels.mat",
)
preprocess = dict(latent_dim_pca=1024, nclusters=100)
train = dict(tau_plus=0.05)
