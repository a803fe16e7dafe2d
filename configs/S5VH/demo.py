# Built-in synthetic demo (20 classes, 25 frames x 512-d); written to <data_root>/demo/ on first use.
# The model is scaled down (one layer, width 64, 8 epochs) so that training three code lengths
# takes about a minute each on a 2-core CPU; everything else is S5VH's default.
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
model = dict(variant="mini", hidden_size=64, decoder_hidden_size=64)
train = dict(batch_size=64, num_epochs=8, warm_up_epoch=4, eval_every=8)
