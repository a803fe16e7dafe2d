import json
import os
import re

import pytest

from tests.conftest import ROOT
from utils.errors import UserError
from utils.config import (CHOICES, ConfigError, build_config, config_fingerprint, config_text,
                          load_saved_config, parse_overrides, save_config)

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


def test_a_config_inherits_the_base_and_its_bases_do_not_loop(tmp_path):
    lone = tmp_path / "lone.py"
    lone.write_text("nbits = 16\n")
    with pytest.raises(ConfigError, match="lone.py does not set .* a config inherits the base"):
        build_config(str(lone))
    (tmp_path / "a.py").write_text("_base_ = 'b.py'\n")
    (tmp_path / "b.py").write_text("_base_ = './a.py'\n")
    with pytest.raises(ConfigError, match="a.py: its _base_ chain comes back to itself"):
        build_config(str(tmp_path / "a.py"))
    (tmp_path / "number.py").write_text("_base_ = 3\n")
    with pytest.raises(ConfigError, match="_base_ must be a path or a list of paths, got 3"):
        build_config(str(tmp_path / "number.py"))


def test_frozen_and_unknown_reads_raise():
    cfg = build_config(os.path.join(CONFIGS, "ucf.py"))
    with pytest.raises(ConfigError):
        cfg.nbits = 16
    with pytest.raises(ConfigError):
        cfg.train.lr = 1.0
    with pytest.raises(KeyError, match="unknown config key 'nope'"):
        cfg.train.nope


def test_saved_config_is_data_and_reloads_identically(tmp_path):
    cfg = build_config(os.path.join(CONFIGS, "fcv.py"), ["nbits=32", "train.lr=2e-4"])
    path = tmp_path / "config.json"
    save_config(cfg, str(path), run_id="abc")
    record = json.loads(path.read_text())           # plain JSON
    assert record["run_id"] == "abc" and record["fingerprint"] == config_fingerprint(cfg)
    again, saved, missing = load_saved_config(str(path))
    assert again.to_dict() == cfg.to_dict() and saved["run_id"] == "abc" and missing == []
    assert config_text(again) == config_text(cfg)
    assert config_fingerprint(again) == config_fingerprint(cfg)
    assert config_fingerprint(build_config(os.path.join(CONFIGS, "fcv.py"), ["nbits=16"])) != \
        config_fingerprint(cfg)


def test_saved_config_with_code_is_not_executed(tmp_path):
    path = tmp_path / "config.json"
    save_config(build_config(os.path.join(CONFIGS, "ucf.py")), str(path))
    marker = tmp_path / "executed"
    record = json.loads(path.read_text())
    record["config"]["dataset"] = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    path.write_text(json.dumps(record))
    with pytest.raises(ConfigError, match="was edited after the run wrote it"):
        load_saved_config(str(path))
    record["fingerprint"] = config_fingerprint(record["config"])      # re-stamped by hand
    path.write_text(json.dumps(record))
    cfg, _, _ = load_saved_config(str(path))          # a string, never run
    assert not marker.exists() and cfg.dataset.startswith("__import__")
    path.write_text(path.read_text() + "\nimport os\n")
    with pytest.raises(UserError, match="config.json: not a readable saved run config"):
        load_saved_config(str(path))


def test_choices_agree_with_the_implementations():
    from dataset.protocol import PROTOCOLS
    from model.mamba import MAMBA_IMPLS
    from model.mixers import ATTENTION_IMPLS, MIXERS
    from model.s5vh import VARIANT_DEPTHS
    from optim.runner import RESIDENT_DTYPES
    assert set(CHOICES["data.protocol"]) == set(PROTOCOLS)
    assert set(CHOICES["model.mamba_impl"]) == set(MAMBA_IMPLS)
    assert set(CHOICES["model.mixer"]) == set(MIXERS)
    assert set(CHOICES["model.attention_impl"]) == set(ATTENTION_IMPLS)
    assert set(CHOICES["model.variant"]) == set(VARIANT_DEPTHS)
    assert set(CHOICES["train.resident_dtype"]) == set(RESIDENT_DTYPES)


@pytest.mark.parametrize("item, fragment", [
    ("nbits=0", "'nbits' must be >= 1 and <= 4096, got 0"),
    ("nbits=-8", "'nbits' must be >= 1"),
    ("nbits=24", "'nbits' must be a power of two"),
    ("train.mask_ratio=1.0", "'train.mask_ratio' must be > 0 and < 1"),
    ("train.mask_ratio=0", "'train.mask_ratio' must be > 0 and < 1"),
    ("train.mask_ratio=0.01", "leaves 25 visible"),
    ("train.batch_size=0", "'train.batch_size' must be >= 2"),
    ("train.batch_size=1", "'train.batch_size' must be >= 2"),
    ("train.num_epochs=0", "'train.num_epochs' must be >= 1"),
    ("eval.topk=(0, 5)", "'eval.topk' must be a non-empty list of integers >= 1"),
    ("eval.topk=()", "'eval.topk' must be a non-empty list"),
    ("model.mixer=gru", "'model.mixer' must be one of"),
    ("train.resident_dtype=int8", "'train.resident_dtype' must be one of"),
    ("model.variant=huge", "'model.variant' must be one of"),
    ("train.select=' val'", "'train.select' must be one of"),
    ("train.val_fraction=0", "'train.val_fraction' must be > 0 and < 1"),
    ("data.holdout_queries=1.0", "'data.holdout_queries' must be > 0 and < 1"),
    ("data.protocol='bogus'", "'data.protocol' must be one of"),
    ("train.lr=1e999", "'train.lr' must be a finite number, got inf"),
    ("train.lr=-1e-3", "'train.lr' must be > 0"),
    ("train.tau_plus=1.0", "'train.tau_plus' must be >= 0 and < 1"),
    ("preprocess.nclusters=1", "'preprocess.nclusters' must be >= 2"),
    ("preprocess.nearest_clusters=200", "'preprocess.nearest_clusters' must be at most"),
    ("train.checkpoint_every=-1", "'train.checkpoint_every' must be >= 0"),
    ("train.checkpoint_seconds=-1", "'train.checkpoint_seconds' must be >= 0"),
    ("nbits=8192", "'nbits' must be >= 1 and <= 4096, got 8192"),
    ("data.train_feats='../secret.h5'", "'data.train_feats' must be a plain file name"),
    ("data.query_labels='/etc/passwd'", "'data.query_labels' must be a plain file name"),
    ("preprocess.artifacts.semantic='sub/semantic.h5'",
     "'preprocess.artifacts.semantic' must be a plain file name"),
    ("preprocess.artifacts.semantic='..'", "'preprocess.artifacts.semantic' must be a plain"),
    ("preprocess.artifacts.hash_center='c_{nbits.__class__}.h5'",
     "'preprocess.artifacts.hash_center' may only use {nbits}"),
    ("preprocess.artifacts.semantic='s_{seed}.h5'", "may only use {nbits}"),
    ("preprocess.artifacts.semantic='ucf_train_feats.h5'",
     "names data/ucf/ucf_train_feats.h5, the input file of 'data.train_feats'"),
    ("preprocess.artifacts.anchors='semantic.h5'", "name the same file"),
    ("train.betas=(0.9,)", "'train.betas' must be two numbers"),
    ("train.monitor=always", "'train.monitor' must be one of"),
    ("data.query_feats=''", "'data.query_feats' is empty"),
    ("model.mixer='attention'|model.num_heads=3", "'model.num_heads' (3) must divide"),
])
def test_out_of_range_values_name_the_key(item, fragment):
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        build_config(os.path.join(CONFIGS, "ucf.py"), item.split("|"))


def test_broken_config_file_is_one_error(tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("_base_ = '../x.py'\nnbits = (\n")
    with pytest.raises(ConfigError, match=r"broken.py \(line \d+\): the config file does not run"):
        build_config(str(broken))
    failing = tmp_path / "failing.py"
    failing.write_text("nbits = 1 / 0\n")
    with pytest.raises(ConfigError, match="ZeroDivisionError"):
        build_config(str(failing))


def test_identity_is_the_result_relevant_keys():
    """Changing a key of NON_RESULT_KEYS keeps the fingerprint; changing any other key moves it."""
    from utils.config import NON_RESULT_KEYS, plain_config
    cfg = build_config(os.path.join(CONFIGS, "ucf.py"))
    base = config_fingerprint(cfg)
    plain = plain_config(cfg)

    def leaves(tree, prefix=""):
        for key, value in tree.items():
            if isinstance(value, dict):
                yield from leaves(value, f"{prefix}{key}.")
            else:
                yield prefix + key, value

    def changed(value):
        if isinstance(value, bool):
            return not value
        if isinstance(value, (int, float)):
            return value + 1
        if isinstance(value, str):
            return value + "x"
        return list(value) + [1]

    seen = set()
    for dotted, value in leaves(plain):
        edited = json.loads(json.dumps(plain))
        node = edited
        *parents, last = dotted.split(".")
        for part in parents:
            node = node[part]
        node[last] = changed(value)
        same = config_fingerprint(edited) == base
        assert same == (dotted in NON_RESULT_KEYS), dotted
        seen.add(dotted)
    assert set(NON_RESULT_KEYS) <= seen                   # every declared key exists


def test_a_run_saved_before_a_key_existed_still_loads(tmp_path, caplog):
    from utils.config import same_experiment
    cfg = build_config(os.path.join(CONFIGS, "ucf.py"))
    path = tmp_path / "config.json"
    save_config(cfg, str(path), run_id="old")
    record = json.loads(path.read_text())
    del record["config"]["train"]["checkpoint_seconds"]   # as a run saved before the key
    del record["config"]["train"]["smoothing_beta"]
    record["fingerprint"] = config_fingerprint(record["config"])
    path.write_text(json.dumps(record))
    again, saved, missing = load_saved_config(str(path))
    assert missing == ["train.smoothing_beta", "train.checkpoint_seconds"]
    assert saved["fingerprint"] == record["fingerprint"]
    assert same_experiment(again, cfg)                     # the defaults: the same experiment


def test_command_line_lists_are_checked():
    from utils.config import check_code_lengths, check_distinct
    with pytest.raises(ConfigError, match="--bits lists 16 more than once"):
        check_code_lengths([16, 32, 16])
    for bad in (0, -8, 5000):
        with pytest.raises(ConfigError, match=f"--bits must be between 1 and 4096, got {bad}"):
            check_code_lengths([bad])
    with pytest.raises(ConfigError, match="--seeds lists 1 more than once"):
        check_distinct([1, 1], "--seeds")


def test_the_deep_ranks_recipe_changes_only_its_two_keys():
    from utils.config import plain_config
    recipe = plain_config(build_config(os.path.join(CONFIGS, "recipes", "deep_ranks.py")))
    base = plain_config(build_config(os.path.join(CONFIGS, "ucf_dev.py")))
    assert recipe["train"].pop("a_cluster") == 1.0 and base["train"].pop("a_cluster") == 0.1
    assert recipe["train"].pop("smoothing_beta") == 0.0
    base["train"].pop("smoothing_beta")
    assert recipe == base
