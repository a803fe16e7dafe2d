"""Preprocess a data set: the artifacts training reads, made from its training features.

Mean-pools every training video over its frames (streamed from the file), reduces the means with
PCA, runs one k-means (video i's pseudo-label is its nearest centroid; the unit centroids are the
semantic centers) and optimises one hash center per cluster for the config's code length
(docs/method.md §5). Writes, beside the features (or into preprocess.artifact_dir), the release's
files final_train_latent_feats.h5, final_train_anchors.h5, final_train_train_assit.h5,
semantic.h5 and hash_center_<B>.h5, a quality report of the centers, and a provenance record per
set. A set whose record matches the current features (sha256) and config is kept as it is, so
running this again costs nothing; train.py runs it itself when needed.

examples:
  python preprocess.py --config configs/S5VH/ucf.py
  python preprocess.py --config configs/S5VH/ucf.py --cfg-options nbits=16 --force
"""
if __name__ == "__main__":      # first: a signal during the imports below is one line too
    from utils.cli import started
    started()

from dataset.demo import ensure_demo_data
from dataset.preprocessing import preprocessed
from dataset.protocol import check_inputs
from utils.cli import command_parser, run_cli
from utils.config import build_config


def parse_args(argv=None):
    parser = command_parser("python preprocess.py", __doc__)
    parser.add_argument("--config", required=True,
                        help="config file of the data set, e.g. configs/S5VH/ucf.py")
    parser.add_argument("--force", action="store_true",
                        help="recompute every artifact even when its record matches")
    parser.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override config keys, e.g. nbits=16 preprocess.nclusters=50 "
                             "data_root=/data")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    cfg = build_config(args.config, args.cfg_options)
    ensure_demo_data(cfg)
    check_inputs(cfg)
    with preprocessed(cfg, force=args.force) as status:
        return status


if __name__ == "__main__":
    run_cli(main)
