import os

import pytest

from tests.conftest import ROOT
from utils.config import ConfigError, build_config, config_text, dump_config, parse_overrides

CONFIGS = os.path.join(ROOT, "configs", "S5VH")


@pytest.mark.parametrize("name", ["act", "fcv", "ucf", "hmdb", "demo", "ucf_dev"])
def test_every_config_resolves(name):
    cfg = build_config(os.path.join(CONFIGS, f"{name}.py"))
    assert cfg.seed == 1 and cfg.train.temperature == 0.5 and cfg.train.smoothing_beta == 0.01
    assert cfg.model.hidden_size == (64 if name == "demo" else 256)
    assert cfg.paths.feature_dir.endswith(cfg.dataset)


def test_dataset_files_set_only_what_differs():
    fcv = build_config(os.path.join(CONFIGS, "fcv.py"))
    ucf = build_config(os.path.join(CONFIGS, "ucf.py"))
    act = build_config(os.path.join(CONFIGS, "act.py"))
    hmdb = build_config(os.path.join(CONFIGS, "hmdb.py"))
    assert (fcv.train.batch_size, fcv.train.mask_ratio, fcv.train.alpha) == (512, 0.75, 2.5)
    assert (fcv.preprocess.nclusters, fcv.data.protocol) == (450, "all_vs_all")
    assert (act.feature_size, act.max_frames, act.train.a_cluster) == (2048, 30, 0.001)
    assert act.data.db_label_key == "re_label" and act.data.query_label_key == "q_label"
    assert hmdb.preprocess.latent_dim_pca == 1024 and hmdb.train.tau_plus == 0.05
    assert ucf.preprocess.nclusters == 101 and ucf.train.warm_up_epoch == 50


def test_nbits_override_moves_every_derived_path():
    cfg = build_config(os.path.join(CONFIGS, "ucf.py"), ["nbits=16", "data_root=/x"])
    assert cfg.paths.hash_center == os.path.join("/x", "ucf", "hash_center_16.h5")
    assert cfg.paths.run_dir.endswith("ucf_16bits")
    assert cfg.paths.query_feats == os.path.join("/x", "ucf", "ucf_test_feats.h5")


def test_dotted_overrides_and_literal_parsing():
    assert parse_overrides(["a.b=1", "a.c=x", "d=(1, 2)"]) == {"a": {"b": 1, "c": "x"},
                                                             "d": (1, 2)}
    cfg = build_config(os.path.join(CONFIGS, "ucf.py"), ["train.lr=1e-3", "train.num_epochs=3"])
    assert cfg.train.lr == 1e-3 and cfg.train.num_epochs == 3
    cfg = build_config(os.path.join(CONFIGS, "ucf.py"), ["train.lr=1"])   # int where float is
    assert cfg.train.lr == 1


@pytest.mark.parametrize("item, fragment", [
    ("train.foo=1", "unknown config key 'train.foo'"),
    ("nbits=1.5", "'nbits' in --cfg-options must be int"),
    ("train.amp=1", "'train.amp'"),
    ("model=3", "'model'"),
    ("nbits", "key=value"),
])
def test_bad_overrides_name_the_key(item, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(".", r"\.")):
        build_config(os.path.join(CONFIGS, "ucf.py"), [item])


def test_unknown_key_in_child_file(tmp_path):
    child = tmp_path / "child.py"
    child.write_text(f"_base_ = {os.path.join(ROOT, 'configs/_base_/s5vh.py')!r}\nlearning_rat = 1\n")
    with pytest.raises(ConfigError, match="unknown config key 'learning_rat'"):
        build_config(str(child))


def test_frozen_and_unknown_reads_raise():
    cfg = build_config(os.path.join(CONFIGS, "ucf.py"))
    with pytest.raises(ConfigError):
        cfg.nbits = 16
    with pytest.raises(ConfigError):
        cfg.train.lr = 1.0
    with pytest.raises(KeyError, match="unknown config key 'nope'"):
        cfg.train.nope


def test_dumped_config_reloads_identically(tmp_path):
    cfg = build_config(os.path.join(CONFIGS, "fcv.py"), ["nbits=32", "train.lr=2e-4"])
    path = tmp_path / "config.py"
    dump_config(cfg, str(path))
    again = build_config(str(path))
    assert again.to_dict() == cfg.to_dict()
    assert config_text(again) == config_text(cfg)
