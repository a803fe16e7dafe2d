# FCVID, VGG features (25 x 4096); all-vs-all retrieval over the 45,600 test videos.
_base_ = "../_base_/s5vh.py"

dataset = "fcv"
data = dict(
    protocol="all_vs_all",
    train_feats="fcv_train_feats.h5",
    train_labels="",
    db_feats="fcv_test_feats.h5",
    db_labels="fcv_test_labels.mat",
)
preprocess = dict(nclusters=450)
# the 45,585 training videos stay on the GPU in bf16 (9.3 GB instead of 18.7 GB)
train = dict(batch_size=512, num_epochs=500, mask_ratio=0.75, alpha=2.5, a_cluster=0.01,
             resident_dtype="bfloat16")
