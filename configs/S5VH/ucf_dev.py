# Development set: VGG16 features (25 x 4096) of 772 real UCF101 videos, 8 classes, one labelled
# file. A seeded 20% of it are the queries; the rest is the training set and the database.
# Put `train_feats.h5` and `train_labels.mat` in <data_root>/ucf_dev/.
_base_ = "../_base_/s5vh.py"

dataset = "ucf_dev"
data = dict(protocol="holdout", holdout_queries=0.2)
preprocess = dict(nclusters=8)   # one cluster per class, as K = #classes on the full sets
train = dict(select="val")
