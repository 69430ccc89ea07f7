"""The training configuration: one TOML file plus ``key=value`` overrides, checked up front.

Contract. ``load_config(path, overrides)`` reads a TOML file (``tomllib``;
``tomli`` before Python 3.11) whose keys are the fields of ``Config`` (flat,
plus the ``[augment]`` table of ``data.augment.AugmentConfig`` fields), then
applies command-line overrides ``key=value`` (``augment.crop_scale=[0.2, 1]``;
a value is read as a TOML value, else as a string), and returns a ``Config``.
Unknown keys are errors that name the closest valid key. Each value is
coerced to its field's declared type or refused (``coerce``): a bool only
from true / false, an integer where an integer is declared, any number as a
float, a list of n numbers for each tuple of ``AugmentConfig``. A config
file that is missing, a folder, not text or not TOML is one line too.

``validate(config, num_instances, world_size)`` is the second check, once the
training set's size N and the number of ranks P are known; every problem is
reported at once, one line each (``ConfigError``): K >= N, alpha outside
[0, 1), tau <= 0, B not divisible by P, N < P, N < B, and so on. Every rank runs
both checks on the same inputs, so every rank stops with the same message;
``config_hash`` is the config's sha256 (the ranks compare theirs with
``parallel.agreement.check_same_config``).

Every field, its default and its meaning is in ``Config`` below;
``refimpl/train/demo.toml`` is a complete example.
"""
import dataclasses
import difflib
import hashlib
import json
import math
import sys
from pathlib import Path

from refimpl.data.augment import AugmentConfig
from refimpl.method.prior import BN_STATISTICS as PRIOR_BN
from refimpl.method.prior import FEATURES as PRIOR_FEATURES
from refimpl.method.prior import ROWS as PRIOR_ROWS
from refimpl.method.prior import TRANSFORMS as PRIOR_TRANSFORMS
from refimpl.models.resnet import ARCHS, STEMS
from refimpl.parallel.data_parallel import BN_MODES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python < 3.11
    import tomli as tomllib


class ConfigError(ValueError):
    """A configuration that cannot run; the message lists every problem."""


@dataclasses.dataclass
class Config:
    """Every setting of a training run (TOML keys = field names)."""
    # ---- data
    train: str = ""               # packed dataset folder or "synthetic:n=...,size=..."
    test: str = ""                # labeled test split for the kNN monitor ("" = none)
    image_size: int = 0           # side S of the network's input (0 = the dataset's)
    augment: dict = dataclasses.field(default_factory=dict)  # AugmentConfig fields
    # ---- model
    arch: str = "resnet18"
    stem: str = "cifar"           # "cifar" (3x3, no max pool) or "imagenet"
    width: int = 64               # base width (64 = torchvision)
    head_hidden: int = 0          # hidden width of the MLP head (0 = the encoder's)
    dim: int = 128                # D, the feature dimension
    init_encoder: str = ""        # torchvision-named .pt/.npz whose encoder weights start the run
    # ---- method
    tau: float = 0.15             # temperature of the cosine classifier
    alpha: float = 0.2            # smoothing weight on the K hardest classes (0: none)
    k: int = 5                    # K, hardest classes per instance
    smooth_from_epoch: int = 1    # first epoch (0-based) with smoothed targets
    # the contrastive prior (method/prior.py; docs/ablation.md measures each value):
    prior: str = "paper"          # "none", or how the rows are made: "paper" (z_hat),
                                  # "centered" (minus the mean), "whitened" (ZCA)
    prior_features: str = "head"  # "head" (z, the paper's) or "pooled" (needs dim = F)
    prior_bn: str = "pass"        # training's BN running statistics: "pass" or "initial"
    prior_transform: str = "eval"  # "eval" (no randomness) or "train" (augmentation)
    prior_scale: float = 1.0      # norm of the written rows (nn.Linear's: about 0.577)
    prior_mix: float = 1.0        # W = mix * scale * rows + (1 - mix) * the random rows
    agreement: bool = True        # neighbour label agreement every epoch (needs labels)
    # ---- optimization
    epochs: int = 30
    batch_size: int = 128         # B, the global batch (B / P per rank)
    lr: float = 0.3               # base learning rate (the same for W and the network)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    decay_bn_and_bias: bool = False  # weight decay on BN and bias parameters too
    warmup_epochs: float = None   # linear warm-up length, in epochs (default: 1, or epochs / 2
                                  # for a 1-epoch run, where 1 would leave no cosine decay)
    warmup_start_factor: float = 0.1  # lr at step 0 = factor * lr (0 would waste step 0)
    final_lr: float = 0.0         # lr at the end of the cosine decay
    # ---- run
    why: str = ""                 # one line on why this config: printed with its method
    seed: int = 0
    dtype: str = "float32"        # one switch: network, classifier, optimizer state
    device: str = "cpu"           # "cpu" or "gpu" (one GPU per rank)
    bn: str = "local"             # BatchNorm across ranks: "local" (DDP) or "sync"
    threads: int = 0              # refimpl threads per rank (0: cores / ranks on the node)
    out: str = "runs/run"         # run directory (metrics, plot, checkpoints)
    log_every: int = 20           # one log line every this many steps
    eval_every: int = 1           # kNN monitor every this many epochs (0: only the last)
    eval_batch_size: int = 256
    knn_k: list = dataclasses.field(default_factory=lambda: [20, 200])
    knn_temperature: float = 0.07
    linear_probe: bool = False    # a linear probe at the end (scikit-learn)
    save_every: int = 1           # checkpoint every this many epochs (0: only the last)
    keep: int = 2                 # complete checkpoints kept

    def __post_init__(self):
        # the default warm-up fits a short run: min(1, epochs / 2) epochs
        if self.warmup_epochs is None:
            epochs = self.epochs if isinstance(self.epochs, (int, float)) else 2
            self.warmup_epochs = min(1.0, epochs / 2)

    def augment_config(self):
        """The AugmentConfig of the training transform."""
        return AugmentConfig(**{k: tuple(v) if isinstance(v, list) else v
                                for k, v in self.augment.items()})

    def to_dict(self):
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(Config)}
AUGMENT_FIELDS = {f.name for f in dataclasses.fields(AugmentConfig)}
# augment.* keys typed by their defaults: a tuple of n numbers stands for "a list of n numbers"
AUGMENT_TYPES = {f.name: (("tuple", len(f.default)) if isinstance(f.default, tuple)
                          else type(f.default)) for f in dataclasses.fields(AugmentConfig)}
PRIORS = ("none",) + PRIOR_ROWS
CHOICES = {"arch": tuple(ARCHS), "stem": STEMS, "prior": PRIORS,
           "prior_features": PRIOR_FEATURES, "prior_bn": PRIOR_BN,
           "prior_transform": PRIOR_TRANSFORMS,
           "dtype": ("float32", "float64"), "device": ("cpu", "gpu"), "bn": BN_MODES}
# The spelling of older configs (and of run directories' config.toml): a bool, or
# its text (an override prior=true reaches a str field as the text "true").
PRIOR_FROM_BOOL = {True: "paper", False: "none", "true": "paper", "false": "none"}


def _closest(key, valid):
    near = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f" (did you mean {near[0]!r}?)" if near else ""


class _Refused(ValueError):
    """A value that its field's declared type refuses; the message says what it needs."""


def _number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def coerce(kind, value):
    """``value`` as the declared type ``kind``, or _Refused saying what was expected.

    kind: bool (true or false only: a TOML boolean, or the text "true" /
    "false"), int (an integer, not a bool), float (any number, as a float), str,
    list (of integers: ``knn_k``; one integer is a list of one), or
    ("tuple", n): a list of n numbers, as floats.
    """
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value in ("true", "false"):
            return value == "true"
        raise _Refused("must be true or false")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Refused("must be an integer")
    if kind is float:
        if _number(value):
            return float(value)
        raise _Refused("must be a number")
    if kind is str:
        if isinstance(value, str):
            return value
        raise _Refused("must be a string")
    if kind is list:
        value = [value] if isinstance(value, int) and not isinstance(value, bool) else value
        if isinstance(value, (list, tuple)) and all(
                isinstance(v, int) and not isinstance(v, bool) for v in value):
            return list(value)
        raise _Refused("must be a list of integers")
    if isinstance(kind, tuple):
        n = kind[1]
        if isinstance(value, (list, tuple)) and len(value) == n and all(map(_number, value)):
            return [float(v) for v in value]
        raise _Refused(f"must be a list of {n} numbers")
    raise TypeError(f"coerce: unknown kind {kind!r}")


def _problems_error(header, problems):
    """A ConfigError: one problem on one line, several one per line under the header."""
    if len(problems) == 1:
        return ConfigError(f"{header}: {problems[0]}")
    return ConfigError(f"{header}:\n  " + "\n  ".join(problems))


def parse_override(text):
    """'key=value' -> (key, value); the value read as TOML, else kept as a string."""
    key, eq, raw = text.partition("=")
    key = key.strip()
    if not eq or not key:
        raise ConfigError(f"override {text!r}: expected key=value")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key, value


def config_from_dict(values, source="config"):
    """A Config from {key: value}; each value coerced to its field's declared type
    (``coerce``; augment.* keys too); every unknown key or refused value reported at once."""
    problems, kwargs = [], {}
    for key, value in values.items():
        if key == "augment":
            if not isinstance(value, dict):
                problems.append(f"augment must be a table of augmentation settings, "
                                f"got {value!r}")
                continue
            augment = {}
            for a, v in value.items():
                if a not in AUGMENT_FIELDS:
                    problems.append(f"unknown key augment.{a}"
                                    f"{_closest(a, sorted(AUGMENT_FIELDS))}")
                    continue
                try:
                    augment[a] = coerce(AUGMENT_TYPES[a], v)
                except _Refused as e:
                    problems.append(f"augment.{a} {e}, got {v!r}")
            kwargs[key] = augment
        elif key not in FIELDS:
            problems.append(f"unknown key {key!r}{_closest(key, sorted(FIELDS))}")
        elif key == "prior" and isinstance(value, (bool, str)) and value in PRIOR_FROM_BOOL:
            kwargs[key] = PRIOR_FROM_BOOL[value]  # prior = true / false: "paper" / "none"
        else:
            try:
                kwargs[key] = coerce(FIELDS[key].type, value)
            except _Refused as e:
                problems.append(f"{key} {e}, got {value!r}")
    if problems:
        raise _problems_error(source, problems)
    return Config(**kwargs)


def packaged_configs(folder=None):
    """{name: path} of the configs that ship inside the package (``refimpl-train demo``).

    folder: the package folder that holds them (default refimpl/train's;
    refimpl-finetune passes refimpl/finetune)."""
    folder = Path(__file__).resolve().parent if folder is None else Path(folder)
    return {p.stem: p for p in sorted(folder.glob("*.toml"))}


def find_config(path, folder=None):
    """The config file ``path`` names: a file, or the name of a packaged config
    (``demo`` or ``demo.toml``, when no such file is here) in ``folder``
    (``packaged_configs``), as a Path."""
    path = Path(path)
    if not path.exists() and len(path.parts) == 1:
        packaged = packaged_configs(folder).get(path.name[:-5] if path.suffix == ".toml"
                                                else path.name)
        if packaged is not None:
            return packaged
    return path


def load_config(path=None, overrides=()):
    """Config from a TOML file (or none: the defaults) and ``key=value`` overrides.

    path: a TOML file, or the name of a packaged config (``packaged_configs``)."""
    values = {}
    if path is not None:
        path = find_config(path)
        try:
            with open(path, "rb") as f:
                values = tomllib.load(f)
        except FileNotFoundError:
            names = ", ".join(packaged_configs())
            raise ConfigError(f"{path}: no such config file (packaged configs, by name: "
                              f"{names})") from None
        except IsADirectoryError:
            raise ConfigError(f"{path}: is a folder, not a config file") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML ({e})") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not a text file (a TOML config is UTF-8 text)") from None
        except OSError as e:  # a folder, no permission
            what = "is a folder, not a config file" if path.is_dir() else \
                f"cannot be read ({e.strerror or e})"
            raise ConfigError(f"{path}: {what}") from None
    for text in overrides:
        key, value = parse_override(text)
        if key in FIELDS and FIELDS[key].type is str and not isinstance(value, str):
            value = text.partition("=")[2].strip()  # out=2024 names a folder, not a number
        if key.startswith("augment."):
            values.setdefault("augment", {})[key[len("augment."):]] = value
        else:
            values[key] = value
    return config_from_dict(values, str(path) if path is not None else "config")


def validate(cfg, num_instances=None, world_size=1):
    """Raise ConfigError listing every problem of ``cfg`` for N instances on P ranks.

    num_instances: N, the size of the training set (None: the checks that need
    it are skipped, e.g. before the dataset is opened).
    """
    p = []
    for name, choices in CHOICES.items():
        if getattr(cfg, name) not in choices:
            p.append(f"{name} must be one of {list(choices)}, got {getattr(cfg, name)!r}")
    if not cfg.train:
        p.append("train: no training set given (a packed dataset folder or "
                 "'synthetic:n=...,size=...')")
    positive = ("width", "dim", "k", "epochs", "batch_size", "log_every", "eval_batch_size",
                "keep")
    for name in positive:
        if getattr(cfg, name) < 1:
            p.append(f"{name} must be >= 1, got {getattr(cfg, name)}")
    for name in ("image_size", "head_hidden", "smooth_from_epoch", "seed", "threads",
                 "eval_every", "save_every"):
        if getattr(cfg, name) < 0:
            p.append(f"{name} must be >= 0, got {getattr(cfg, name)}")
    if not 0 < cfg.tau < math.inf:
        p.append(f"tau must be > 0 (and finite), got {cfg.tau}")
    if not 0 <= cfg.alpha < 1:
        p.append(f"alpha must lie in [0, 1), got {cfg.alpha}")
    if not 0 < cfg.prior_scale < math.inf:
        p.append(f"prior_scale must be > 0 (and finite), got {cfg.prior_scale}")
    if not 0 < cfg.prior_mix <= 1:
        p.append(f"prior_mix must lie in (0, 1], got {cfg.prior_mix}")
    if cfg.prior_features == "pooled" and cfg.arch in ARCHS and cfg.width >= 1:
        pooled = 8 * cfg.width * ARCHS[cfg.arch][0].expansion  # the encoder's output F
        if cfg.dim != pooled:
            p.append(f"prior_features = 'pooled' writes the pooled encoder features "
                     f"(F = {pooled} for {cfg.arch} width {cfg.width}) into rows of "
                     f"dim = {cfg.dim}: set dim = {pooled}, or prior_features = 'head'")
    for name in ("lr", "momentum", "weight_decay", "final_lr"):
        if not 0 <= getattr(cfg, name) < math.inf:
            p.append(f"{name} must be finite and >= 0, got {getattr(cfg, name)}")
    if cfg.nesterov and cfg.momentum <= 0:
        p.append("nesterov needs momentum > 0")
    if not 0 <= cfg.warmup_epochs < cfg.epochs:
        p.append(f"warmup_epochs must lie in [0, epochs = {cfg.epochs}), got {cfg.warmup_epochs} "
                 f"(set warmup_epochs={min(1.0, cfg.epochs / 2):g}, or leave it out: the "
                 f"default is min(1, epochs / 2))")
    if not 0 <= cfg.warmup_start_factor <= 1:
        p.append(f"warmup_start_factor must lie in [0, 1], got {cfg.warmup_start_factor}")
    if not cfg.knn_k or not all(isinstance(k, int) and k >= 1 for k in cfg.knn_k):
        p.append(f"knn_k must be a list of positive integers, got {cfg.knn_k!r}")
    if not 0 < cfg.knn_temperature < math.inf:
        p.append(f"knn_temperature must be > 0, got {cfg.knn_temperature}")
    try:
        cfg.augment_config()
    except (TypeError, ValueError) as e:
        p.append(f"augment: {e}")
    if cfg.init_encoder and not cfg.init_encoder.endswith((".pt", ".npz")):
        p.append(f"init_encoder must be a .pt or .npz state dict (torchvision names), got "
                 f"{cfg.init_encoder!r}")
    elif cfg.init_encoder and not Path(cfg.init_encoder).is_file():
        p.append(f"init_encoder: no such file {cfg.init_encoder!r}")
    B, P = cfg.batch_size, world_size
    if B >= 1 and B % P:
        p.append(f"batch_size B = {B} is not divisible by P = {P} ranks: every rank "
                 f"needs the same local batch (choose B as a multiple of P)")
    if num_instances is not None:
        N = num_instances
        if N < 1:
            p.append(f"train: the training set {cfg.train!r} is empty")
        else:
            if N < P:
                p.append(f"N = {N} instances for P = {P} ranks: every rank needs at least "
                         f"one row of the classifier (N >= P)")
            if cfg.k >= N:
                p.append(f"k = {cfg.k} hardest classes per instance needs N > K instances, "
                         f"got N = {N}")
            if B > N:
                p.append(f"batch_size B = {B} is larger than the training set (N = {N}): "
                         f"an epoch would have no step")
    if p:
        raise _problems_error("the configuration cannot run", p)


def config_hash(cfg):
    """sha256 of the config's canonical JSON: equal on every rank of one run."""
    text = json.dumps(cfg.to_dict(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def to_toml(cfg):
    """The config as TOML text (saved in the run directory; loads back with load_config)."""
    lines = []
    for name, value in cfg.to_dict().items():
        if name != "augment":
            lines.append(f"{name} = {_toml_value(value)}")
    if cfg.augment:
        lines.append("\n[augment]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in cfg.augment.items()]
    return "\n".join(lines) + "\n"


def _toml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, str):
        return json.dumps(v)
    return repr(v)
