"""The training config: TOML + key=value overrides, every bad input named up front."""
import pytest

from refimpl.train.config import (Config, ConfigError, config_hash, load_config, parse_override,
                                  to_toml, validate)


def write(tmp_path, text):
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def test_toml_overrides_and_round_trip(tmp_path):
    path = write(tmp_path, 'train = "data/x"\nalpha = 0.1\nwidth = 8\n[augment]\n'
                           'crop_scale = [0.2, 1.0]\n')
    cfg = load_config(path, ["alpha=0", "epochs=3", "augment.flip_p=0", 'out=runs/a b',
                             "knn_k=[5, 10]"])
    assert (cfg.train, cfg.alpha, cfg.width, cfg.epochs, cfg.out) == ("data/x", 0, 8, 3, "runs/a b")
    assert cfg.knn_k == [5, 10]
    aug = cfg.augment_config()
    assert aug.crop_scale == (0.2, 1.0) and aug.flip_p == 0
    again = load_config(write(tmp_path, to_toml(cfg)))
    assert again == cfg and config_hash(again) == config_hash(cfg)
    assert config_hash(load_config(path, ["alpha=0.3"])) != config_hash(cfg)
    assert parse_override("train=synthetic:n=10,size=8") == ("train", "synthetic:n=10,size=8")
    assert load_config(None, ["train=x"]).train == "x"  # no file: the defaults


def test_unknown_keys_name_the_closest(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, 'train = "x"\nalhpa = 0.1\n[augment]\ncrop_scal = [0.2, 1]\n'),
                    ["epoch=3", "lr=fast"])
    msg = str(e.value)
    assert "unknown key 'alhpa' (did you mean 'alpha'?)" in msg
    assert "unknown key augment.crop_scal (did you mean 'crop_scale'?)" in msg
    assert "unknown key 'epoch' (did you mean 'epochs'?)" in msg
    assert "lr must be a number, got 'fast'" in msg  # every problem at once


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "train = \n"))
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(None, ["alpha"])


@pytest.mark.parametrize("changes,N,P,message", [
    (dict(k=5), 5, 1, "k = 5 hardest classes per instance needs N > K instances, got N = 5"),
    (dict(alpha=1.0), 100, 1, r"alpha must lie in [0, 1), got 1.0"),
    (dict(alpha=-0.1), 100, 1, r"alpha must lie in [0, 1)"),
    (dict(tau=0.0), 100, 1, "tau must be > 0"),
    (dict(tau=float("inf")), 100, 1, "tau must be > 0"),
    (dict(batch_size=13), 100, 2, "batch_size B = 13 is not divisible by P = 2 ranks"),
    (dict(batch_size=4), 3, 4, "N = 3 instances for P = 4 ranks"),
    (dict(), 0, 1, "is empty"),
    (dict(batch_size=64), 50, 1, "batch_size B = 64 is larger than the training set (N = 50)"),
    (dict(train=""), 100, 1, "train: no training set given"),
    (dict(bn="global"), 100, 1, "bn must be one of ['local', 'sync'], got 'global'"),
    (dict(dtype="float16"), 100, 1, "dtype must be one of ['float32', 'float64']"),
    (dict(warmup_epochs=30), 100, 1, "warmup_epochs must lie in [0, epochs = 30)"),
    (dict(lr=float("nan")), 100, 1, "lr must be finite and >= 0"),
    (dict(augment={"crop_scale": [0.5, 0.2]}), 100, 1, "augment: crop_scale must satisfy"),
    (dict(knn_k=[0]), 100, 1, "knn_k must be a list of positive integers"),
    (dict(prior="zca"), 100, 1,
     "prior must be one of ['none', 'paper', 'centered', 'whitened'], got 'zca'"),
    (dict(prior_features="encoder"), 100, 1,
     "prior_features must be one of ['head', 'pooled'], got 'encoder'"),
    (dict(prior_bn="eval"), 100, 1, "prior_bn must be one of ['pass', 'initial'], got 'eval'"),
    (dict(prior_transform="random"), 100, 1, "prior_transform must be one of ['eval', 'train']"),
    (dict(prior_scale=0.0), 100, 1, "prior_scale must be > 0 (and finite), got 0.0"),
    (dict(prior_scale=float("inf")), 100, 1, "prior_scale must be > 0 (and finite)"),
    (dict(prior_mix=0.0), 100, 1, "prior_mix must lie in (0, 1], got 0.0"),
    (dict(prior_mix=1.5), 100, 1, "prior_mix must lie in (0, 1], got 1.5"),
    (dict(prior_features="pooled", width=16, dim=64), 100, 1,
     "prior_features = 'pooled' writes the pooled encoder features (F = 128 for resnet18 "
     "width 16) into rows of dim = 64: set dim = 128, or prior_features = 'head'"),
    (dict(prior_features="pooled", arch="resnet50", width=8, dim=128), 100, 1, "(F = 256"),
])
def test_validate_names_each_problem(changes, N, P, message):
    cfg = Config(**{"train": "data/x", "batch_size": 4, **changes})
    with pytest.raises(ConfigError) as e:
        validate(cfg, N, P)
    assert message in str(e.value)


def test_validate_reports_all_problems_at_once():
    cfg = Config(train="x", alpha=2.0, tau=-1.0, k=500, batch_size=6)
    with pytest.raises(ConfigError) as e:
        validate(cfg, 100, 4)
    lines = str(e.value).splitlines()[1:]
    assert len(lines) == 4 and any("alpha" in x for x in lines) and any("tau" in x for x in lines)
    validate(Config(train="x", batch_size=8), 100, 4)  # a good one passes


@pytest.mark.parametrize("prior", ["none", "paper", "centered", "whitened"])
def test_every_prior_and_its_options_pass(prior):
    cfg = load_config(None, ["train=x", "batch_size=8", f"prior={prior}", "prior_bn=initial",
                             "prior_transform=train", "prior_scale=0.577", "prior_mix=0.5",
                             "prior_features=pooled", "width=16", "dim=128",
                             "why='a reason'"])
    assert (cfg.prior, cfg.prior_bn, cfg.prior_scale, cfg.prior_mix) == \
        (prior, "initial", 0.577, 0.5)
    validate(cfg, 100, 1)
    validate(load_config(None, ["train=x", "batch_size=8", "prior_mix=1", "prior_scale=2"]),
             100, 1)


def test_prior_as_a_bool_is_the_older_spelling(tmp_path):
    """prior = true / false (configs and run directories written before the variants)."""
    assert load_config(write(tmp_path, 'train = "x"\nprior = true\n')).prior == "paper"
    assert load_config(None, ["train=x", "prior=false"]).prior == "none"
    assert load_config(None, ["train=x", "prior=true"]).prior == "paper"
    with pytest.raises(ConfigError, match="prior must be a string, got 1$"):
        load_config(write(tmp_path, 'train = "x"\nprior = 1\n'))
    with pytest.raises(ConfigError, match="prior must be one of .*'whitened'], got 'yes'$"):
        validate(load_config(None, ["train=x", "batch_size=8", "prior=yes"]), 100, 1)


def test_the_shipped_configs_validate():
    """demo.toml and digits.toml load and pass (their datasets are made by make demo)."""
    from pathlib import Path
    for name in ("demo.toml", "digits.toml"):
        cfg = load_config(Path(__file__).resolve().parents[1] / "refimpl" / "train" / name)
        validate(cfg, None, 2)
        assert cfg.why, f"{name} says why it trains with its method"


@pytest.mark.parametrize("override,message", [
    ("augment.crop=no", "augment.crop must be true or false, got 'no'"),
    ("augment.crop=1", "augment.crop must be true or false, got 1"),
    ("augment.crop=[0.2, 1.0]", "augment.crop must be true or false, got [0.2, 1.0]"),
    ('augment.normalize="off"', "augment.normalize must be true or false, got 'off'"),
    ("augment.crop_scale=abc", "augment.crop_scale must be a list of 2 numbers, got 'abc'"),
    ("augment.crop_scale=[0.2]", "augment.crop_scale must be a list of 2 numbers, got [0.2]"),
    ('augment.crop_ratio=[1, "a"]', "augment.crop_ratio must be a list of 2 numbers, got [1, 'a']"),
    ("augment.mean=[0.5, 0.5]", "augment.mean must be a list of 3 numbers, got [0.5, 0.5]"),
    ("augment.flip_p=half", "augment.flip_p must be a number, got 'half'"),
    ("augment.flip_p=true", "augment.flip_p must be a number, got True"),
    ("augment.jitter_order=1", "augment.jitter_order must be a string, got 1"),
    ("prior_mix=half", "prior_mix must be a number, got 'half'"),
    ("epochs=2.5", "epochs must be an integer, got 2.5"),
    ("epochs=true", "epochs must be an integer, got True"),
    ("knn_k=[5, 2.5]", "knn_k must be a list of integers, got [5, 2.5]"),
])
def test_values_of_the_wrong_type_are_refused_in_one_line(override, message):
    """Each value is coerced to its field's declared type or refused, augment.* too:
    formerly "no" was stored as a (truthy) string and crop stayed on."""
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train=x", override])
    assert str(e.value) == f"config: {message}"


def test_values_are_coerced_to_their_declared_types():
    """true / false (also as text) for bools, any number for floats, a list of n numbers
    for the augmentation tuples, one integer for knn_k; a str field keeps the text."""
    cfg = load_config(None, ["train=x", "augment.crop=false", 'augment.normalize="false"',
                             "augment.crop_scale=[1, 1]", "augment.flip_p=0", "alpha=0",
                             "knn_k=7", "out=2024", "prior=true"])
    aug = cfg.augment_config()
    assert aug.crop is False and aug.normalize is False and aug.crop_scale == (1.0, 1.0)
    assert isinstance(aug.flip_p, float) and isinstance(cfg.alpha, float) and cfg.alpha == 0
    assert cfg.knn_k == [7] and cfg.out == "2024" and cfg.prior == "paper"


def test_a_config_path_that_is_a_folder_or_binary_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"^.*: is a folder, not a config file$"):
        load_config(tmp_path)
    binary = tmp_path / "x.toml"
    binary.write_bytes(b"\x80\x81\xfe\xff\x00 = 1\n")
    with pytest.raises(ConfigError, match=r"x.toml: not a text file \(a TOML config is UTF-8 "
                                          r"text\)$"):
        load_config(binary)
