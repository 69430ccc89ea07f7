"""The fine-tuning configuration: one TOML file plus ``key=value`` overrides, checked up front.

Contract. The same rules as ``train.config`` (whose ``ConfigError``,
``parse_override``, ``config_hash`` and ``to_toml`` it uses): the TOML keys
are the fields of ``FineTuneConfig`` (flat, plus the ``[augment]`` table of
``data.augment.AugmentConfig`` fields), ``key=value`` overrides are read as
TOML values, unknown keys name the closest valid one, and every problem is
reported at once, one line each. Three checks, each on every rank:

    load_config(path, overrides)        keys and types
    validate(cfg, world_size)           values: the labeled fraction in (0, 1],
                                        B divisible by P, learning rates, ...
    validate_labels(cfg, train, test)   the datasets' labels: every training
                                        image labeled, C >= 2 classes, each
                                        present, test labels in [0, C)

``resolve_architecture(cfg)`` fills arch, stem and width from the ``init``
checkpoint when they are left unset ("", "", 0), else with resnet18, cifar,
64, and refuses a checkpoint of another architecture than the one asked for;
``resolve_data(cfg)`` fills an unset ``train`` (and then ``test``, unless
given) with the datasets the ``init`` checkpoint was pretrained on.

``refimpl/finetune/demo.toml`` is a complete example.
"""
import dataclasses
import difflib
import math
import sys
from pathlib import Path

import numpy as np

from refimpl.data.augment import AugmentConfig
from refimpl.finetune.init import ARCH_FIELDS, SCRATCH, check_architecture, init_kind
from refimpl.models.resnet import ARCHS, STEMS
from refimpl.parallel.data_parallel import BN_MODES
from refimpl.train.config import ConfigError, find_config, packaged_configs, parse_override

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python < 3.11
    import tomli as tomllib

DEFAULT_ARCH = {"arch": "resnet18", "stem": "cifar", "width": 64}
PACKAGED = Path(__file__).resolve().parent  # the configs found by name: refimpl-finetune demo


@dataclasses.dataclass
class FineTuneConfig:
    """Every setting of a fine-tuning run (TOML keys = field names)."""
    # ---- data
    train: str = ""               # labeled training set: packed folder or "synthetic:..."
                                  # ("" with init a refimpl-train run: the run's own)
    test: str = ""                # labeled test split: top-1 / top-5 every eval ("" = none,
                                  # or the run's own when train is taken from it)
    image_size: int = 0           # side S of the network's input (0 = the dataset's)
    augment: dict = dataclasses.field(default_factory=dict)  # AugmentConfig fields
    labels: float = 1.0           # fraction of the training labels used, in (0, 1]
    labels_seed: int = 0          # seed of the class-balanced labeled subset
    # ---- model
    init: str = ""                # "scratch", a refimpl-train run/checkpoint dir, a .pt/.npz
    arch: str = ""                # "" = the init checkpoint's (else resnet18)
    stem: str = ""                # "" = the init checkpoint's (else cifar)
    width: int = 0                # 0 = the init checkpoint's (else 64)
    freeze_encoder: bool = False  # train the FC only, on frozen features (eval-mode BN)
    # ---- optimization
    epochs: int = 30
    steps_per_epoch: int = 0      # 0: one pass over the labeled images (n // B, at least 1)
    batch_size: int = 64          # B, the global batch (B / P per rank)
    lr_fc: float = 0.1            # base learning rate of the FC
    lr_encoder: float = 0.01      # base learning rate of the encoder (unused when frozen)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    decay_bn_and_bias: bool = False  # weight decay on BN and bias parameters too
    warmup_epochs: float = 1.0    # linear warm-up length, in epochs
    warmup_start_factor: float = 0.1  # lr at step 0 = factor * base lr
    final_lr_factor: float = 0.0  # lr at the end of the cosine = factor * base lr
    # ---- run
    seed: int = 0
    dtype: str = "float32"        # network and optimizer state
    device: str = "cpu"           # "cpu" or "gpu" (one GPU per rank)
    bn: str = "local"             # BatchNorm across ranks: "local" (DDP) or "sync"
    threads: int = 0              # refimpl threads per rank (0: cores / ranks on the node)
    out: str = "runs/finetune"    # run directory (metrics, plot, subset, checkpoints)
    log_every: int = 20           # one log line every this many steps
    eval_every: int = 1           # test accuracy every this many epochs (0: only the last)
    eval_batch_size: int = 256
    save_every: int = 1           # checkpoint every this many epochs (0: only the last)
    keep: int = 2                 # complete checkpoints kept

    def augment_config(self):
        """The AugmentConfig of the training transform (its normalization also the eval's)."""
        return AugmentConfig(**{k: tuple(v) if isinstance(v, list) else v
                                for k, v in self.augment.items()})

    def to_dict(self):
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(FineTuneConfig)}
AUGMENT_FIELDS = {f.name for f in dataclasses.fields(AugmentConfig)}
CHOICES = {"dtype": ("float32", "float64"), "device": ("cpu", "gpu"), "bn": BN_MODES}


def _closest(key, valid):
    near = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f" (did you mean {near[0]!r}?)" if near else ""


def _type_ok(name, value):
    """Does ``value`` have the type of field ``name``? (ints are fine for floats)"""
    default = getattr(FineTuneConfig(), name)
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, type(default))


def config_from_dict(values, source="config"):
    """A FineTuneConfig from {key: value}; every unknown key or wrong type at once."""
    problems, kwargs = [], {}
    for key, value in values.items():
        if key == "augment":
            if not isinstance(value, dict):
                problems.append(f"augment must be a table of augmentation settings, "
                                f"got {value!r}")
                continue
            problems += [f"unknown key augment.{a}{_closest(a, sorted(AUGMENT_FIELDS))}"
                         for a in value if a not in AUGMENT_FIELDS]
            kwargs[key] = dict(value)
        elif key not in FIELDS:
            problems.append(f"unknown key {key!r}{_closest(key, sorted(FIELDS))}")
        elif not _type_ok(key, value):
            want = type(getattr(FineTuneConfig(), key)).__name__
            problems.append(f"{key} must be a {want}, got {value!r}")
        else:
            kwargs[key] = float(value) if isinstance(FIELDS[key].default, float) else value
    if problems:
        raise ConfigError(f"{source}:\n  " + "\n  ".join(problems))
    return FineTuneConfig(**kwargs)


def load_config(path=None, overrides=()):
    """FineTuneConfig from a TOML file (or none: the defaults) and ``key=value`` overrides.

    path: a TOML file, or the name of a config in refimpl/finetune (``demo``)."""
    values = {}
    if path is not None:
        path = find_config(path, PACKAGED)
        try:
            with open(path, "rb") as f:
                values = tomllib.load(f)
        except FileNotFoundError:
            names = ", ".join(packaged_configs(PACKAGED))
            raise ConfigError(f"{path}: no such config file (packaged configs, by name: "
                              f"{names})") from None
        except IsADirectoryError:
            raise ConfigError(f"{path}: is a folder, not a config file") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML ({e})") from None
    for text in overrides:
        key, value = parse_override(text)
        if key.startswith("augment."):
            values.setdefault("augment", {})[key[len("augment."):]] = value
        else:
            values[key] = value
    return config_from_dict(values, str(path) if path is not None else "config")


def validate(cfg, world_size=1):
    """Raise ConfigError listing every problem of ``cfg`` for P = world_size ranks."""
    p = []
    for name, choices in CHOICES.items():
        if getattr(cfg, name) not in choices:
            p.append(f"{name} must be one of {list(choices)}, got {getattr(cfg, name)!r}")
    if cfg.arch and cfg.arch not in ARCHS:
        p.append(f"arch must be one of {sorted(ARCHS)} (or unset: the checkpoint's), "
                 f"got {cfg.arch!r}")
    if cfg.stem and cfg.stem not in STEMS:
        p.append(f"stem must be one of {list(STEMS)} (or unset: the checkpoint's), "
                 f"got {cfg.stem!r}")
    if not cfg.train and (not cfg.init or init_kind(cfg.init) != "checkpoint"):
        p.append("train: no training set given (a labeled packed dataset folder or "
                 "'synthetic:n=...,size=...'; unset, with init a refimpl-train run, it is "
                 "the run's own training set)")
    if not cfg.init:
        p.append("init: where the encoder starts is not given: a refimpl-train run "
                 "directory, one of its ckpt-* directories, a .pt/.npz encoder, or "
                 "'scratch' (random initialization, the baseline)")
    if not (0 < cfg.labels <= 1):
        p.append(f"labels must be the fraction of the training labels to use, in (0, 1] "
                 f"(0.01 = 1%), got {cfg.labels}")
    for name in ("epochs", "batch_size", "log_every", "eval_batch_size", "keep"):
        if getattr(cfg, name) < 1:
            p.append(f"{name} must be >= 1, got {getattr(cfg, name)}")
    for name in ("width", "image_size", "labels_seed", "seed", "threads", "eval_every",
                 "save_every", "steps_per_epoch"):
        if getattr(cfg, name) < 0:
            p.append(f"{name} must be >= 0, got {getattr(cfg, name)}")
    for name in ("lr_fc", "lr_encoder", "momentum", "weight_decay"):
        if not 0 <= getattr(cfg, name) < math.inf:
            p.append(f"{name} must be finite and >= 0, got {getattr(cfg, name)}")
    if cfg.nesterov and cfg.momentum <= 0:
        p.append("nesterov needs momentum > 0")
    if not 0 <= cfg.warmup_epochs < cfg.epochs:
        p.append(f"warmup_epochs must lie in [0, epochs = {cfg.epochs}), got {cfg.warmup_epochs}")
    for name in ("warmup_start_factor", "final_lr_factor"):
        if not 0 <= getattr(cfg, name) <= 1:
            p.append(f"{name} must lie in [0, 1], got {getattr(cfg, name)}")
    try:
        cfg.augment_config()
    except (TypeError, ValueError) as e:
        p.append(f"augment: {e}")
    if cfg.init and init_kind(cfg.init) == "file" and not Path(cfg.init).is_file():
        p.append(f"init: no such file {cfg.init!r}")
    B, P = cfg.batch_size, world_size
    if B >= 1 and B % P:
        p.append(f"batch_size B = {B} is not divisible by P = {P} ranks: every rank "
                 f"needs the same local batch (choose B as a multiple of P)")
    if p:
        raise ConfigError("the configuration cannot run:\n  " + "\n  ".join(p))


def resolve_data(cfg):
    """``cfg`` with train (and test) set: unset train with a refimpl-train checkpoint as
    init means the datasets it was pretrained on (its train and, unless test is
    given, its test split); reads the checkpoint's meta."""
    if cfg.train or init_kind(cfg.init) != "checkpoint":
        return cfg
    from refimpl.finetune.init import checkpoint_data
    data = checkpoint_data(cfg.init)
    return dataclasses.replace(cfg, train=data["train"], test=cfg.test or data["test"])


def resolve_architecture(cfg):
    """``cfg`` with arch, stem and width set (module docstring); reads the checkpoint."""
    given = {k: getattr(cfg, k) for k in ARCH_FIELDS if getattr(cfg, k)}
    if init_kind(cfg.init) == "checkpoint":
        from refimpl.finetune.init import checkpoint_architecture
        filled = {**checkpoint_architecture(cfg.init), **given}
        resolved = dataclasses.replace(cfg, **filled)
        check_architecture(cfg.init, resolved)
        return resolved
    return dataclasses.replace(cfg, **{**DEFAULT_ARCH, **given})


def num_classes(labels):
    """C, the number of classes of a training set's labels: max + 1."""
    return int(np.max(labels)) + 1


def validate_labels(cfg, train_labels, test_labels=None):
    """Raise ConfigError unless the datasets' labels allow a C-way fine-tune.

    train_labels: (N,) of the training set, every image labeled (-1 =
    unknown is refused), C = max + 1 >= 2 classes, each with an image;
    test_labels: None, or (M,) in [0, C).
    """
    p = []
    y = np.asarray(train_labels)
    unknown = int(np.sum(y < 0))
    if unknown == y.size:
        p.append(f"train: the dataset {cfg.train!r} has no labels (every label is -1): "
                 f"fine-tuning trains a classifier of its classes")
    elif unknown:
        p.append(f"train: {unknown} of {y.size} images of {cfg.train!r} have no label (-1): "
                 f"fine-tuning needs every training image labeled ('labels' picks the "
                 f"subset to use)")
    else:
        C = num_classes(y)
        counts = np.bincount(y, minlength=C)
        if C < 2:
            p.append(f"train: {cfg.train!r} has one class only (C = 1): a classifier needs "
                     f"C >= 2 classes")
        elif np.any(counts == 0):
            empty = np.flatnonzero(counts == 0)
            p.append(f"train: classes {empty[:8].tolist()} of 0..{C - 1} have no training "
                     f"image in {cfg.train!r}")
        if test_labels is not None:
            t = np.asarray(test_labels)
            if t.size and (t.min() < 0 or t.max() >= C):
                p.append(f"test: labels of {cfg.test!r} lie in [{int(t.min())}, "
                         f"{int(t.max())}], the training set has classes 0..{C - 1}")
    if p:
        raise ConfigError("the datasets cannot be used:\n  " + "\n  ".join(p))


def is_scratch(cfg):
    return cfg.init == SCRATCH
