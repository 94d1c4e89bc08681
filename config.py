"""The typed configuration of a training run: every option, its default and its help, in one place.

    cfg = config.Config()                               # the study's recipe (C-50), the defaults
    cfg = config.from_command_line(argv).cfg            # defaults <- --recipe <- --demo <- --config files <- flags

Five sections of plain data (run, model, train, data, augment); the command line is generated from them
(every field is a flag of the same name, `--warmup-epochs` for `warmup_epochs`), recipes are YAML files
nested by section (recipes/*.yaml), and config.json in a run folder holds the resolved configuration in
the same schema, so `python train.py --config runs/<name>/config.json` replays a run. A misspelled key or
a value of the wrong type is a ConfigError naming the file, the key and the fix.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from common import UsageError, project_dir

from images import ImageSize

RECIPES_DIR = project_dir("recipes")  # recipes/ in a checkout; share/ghostcars/recipes after `pip install .`
AUG_NAMES = ("flip", "affine", "jitter", "rotation", "perspective", "resized_crop")  # augment.py's
# a replayed config.json is a new run: these name the run, not how it trains
RUN_IDENTITY = ("name", "resume", "resume_if_exists")
PER_EPOCH_SCHEDULES = ("multistep", "plateau", "exponential")  # the study's: stepped after each epoch


class ConfigError(UsageError):
    """A configuration that cannot be used; one line naming the file, the key and the fix."""


def opt(default: Any, help: str, **kw: Any) -> Any:
    """A field with its help (and argparse extras: choices, nargs, metavar, negatable, hidden, parse)."""
    meta = {"help": help, **kw}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class RunConfig:
    data: str = opt("data", "dataset folder (DIR or DIR/stanford_cars); see README")
    out: str = opt("runs", "parent folder of run folders")
    name: str | None = opt(None, "run folder name (default: <date>-<time>-<arch>)")
    demo: bool = opt(False, "train on synthetic demo data (made under --out) in ~1 min")
    recipe: str = opt("study", "preset of defaults, recipes/<NAME>.yaml: study = the study's C-50 (about 130 epochs "
                      "at 227 px); fast = the best model in --epochs epochs; flags given explicitly still win",
                      choices="recipes")
    resume: str | None = opt(None, "continue the run in RUN_DIR from its last.pt", metavar="RUN_DIR")
    resume_if_exists: bool = opt(False, "continue <out>/<name> when it holds last.pt, else start it: the same "
                                 "command works for a first start and for every restart (torchrun --max-restarts)")
    init_from: str | None = opt(None, "fine-tune: start from CKPT's matching weights (new classifier if class count "
                                "differs)", metavar="CKPT")
    seed: int = opt(0, "seeds model init, shuffling, augmentation, splits")
    deterministic: bool = opt(False, "deterministic algorithms (bit-exact reruns on the same machine; slower on CUDA)")
    device: str = opt("auto", "auto (cuda when present, else cpu), cpu, cuda, cuda:1, ...")
    workers: int | None = opt(None, "image decoding processes (default: CPU count)")
    threads: int | None = opt(None, "torch CPU threads (default: torch's, one per core; the demo uses 1)")
    max_steps: int | None = opt(None, "stop after this many optimizer steps in all (smoke runs); a stop inside an "
                                "epoch saves last.pt there, and --resume continues exactly from that step")
    tensorboard: bool = opt(True, "write TensorBoard event files into the run folder (tensorboard --logdir runs)",
                            negatable=True)
    cache_dir: str | None = opt(None, "decoded-image cache (default: ~/.cache/ghostcars or $GHOSTCARS_CACHE)")
    limit_train: int | None = opt(None, "a seeded subset of the training images (tests)", hidden=True)
    limit_val: int | None = opt(None, "a seeded subset of the validation images (tests)", hidden=True)


@dataclass
class ModelConfig:
    arch: str = opt("ghostnet", "architecture (model.ARCHS)")
    dropout: float = opt(0.2, "dropout before the classifier")
    out_channels: int = opt(320, "width of the last feature layer")
    width: float = opt(1.0, "channel multiplier (ghostnet)")
    zero_init_residual: bool = opt(False, "start each GhostBottleneck as the identity (its last BN scales zero)")
    ghost_op: str = opt("auto", "GhostModule implementation: fused C++/CUDA op (ext), plain PyTorch (torch), or auto",
                        choices=("auto", "ext", "torch"))


@dataclass
class TrainConfig:
    batch_size: int = opt(64, "images per optimizer step; under torchrun PER RANK (global = this x world size)")
    epochs: int = opt(200, "maximum epochs (early stopping may end sooner)")
    lr: float = opt(1e-3, "initial learning rate")
    optimizer: str = opt("adamw", "optimizer", choices=("adamw", "adam", "sgd"))
    wd: float = opt(0.6, "weight decay (decoupled for adamw, L2 for adam/sgd)")
    momentum: float = opt(0.9, "sgd momentum")
    label_smoothing: float = opt(0.1, "0 = plain cross entropy")
    scheduler: str = opt("multistep", "LR schedule. multistep, plateau (the study's 'automatic' one) and exponential "
                         "step once per epoch; cosine and linear step per optimizer step, after --warmup-epochs, down "
                         "to --min-lr at the last step of --epochs; none = constant (after any warm-up)",
                         choices=("multistep", "plateau", "exponential", "cosine", "linear", "none"))
    milestones: list[int] = opt([67, 82, 95, 107], "multistep epochs", nargs="+")
    gamma: float = opt(0.1, "multistep LR factor")
    exp_base: float = opt(0.975, "exponential: lr *= base each epoch (0.955..0.98)")
    plateau_factor: float = opt(0.1, "plateau: LR factor on a val-loss plateau")
    plateau_patience: int = opt(10, "plateau: epochs without val-loss progress")
    min_lr: float = opt(0.0, "lowest LR of cosine/linear decay; plateau min_lr")
    warmup_epochs: float = opt(0.0, "linear LR warm-up from ~0 over this many epochs (fractions allowed; per-step "
                               "schedules)")
    ema: float = opt(0.0, "exponential moving average of the weights (and BN statistics) with this decay per step, "
                     "e.g. 0.999; validation, best.pt and final.pt use it. 0 = off", metavar="DECAY")
    wd_norm_bias: bool = opt(True, "weight decay also on BatchNorm weights and biases (the study's choice)",
                             negatable=True)
    patience: int = opt(15, "early stopping: epochs without progress in --early-stop-on (0=off)")
    # the study watches the loss; on short budgets the loss can rise (overconfidence) while accuracy still
    # climbs, and val_acc then stops later
    early_stop_on: str = opt("val_loss", "early stopping watches a lower val loss (the study) or a higher val "
                             "accuracy", choices=("val_loss", "val_acc"))
    amp: bool | None = opt(None, "mixed precision autocast (default: on for CUDA, off for CPU)", negatable=True)
    amp_dtype: str = opt("auto", "auto: bfloat16 on CPU and on CUDA that supports it, else float16 (with GradScaler)",
                         choices=("auto", "float16", "bfloat16"))
    channels_last: bool = opt(False, "NHWC memory format for model and batches (on a CPU: 1.3x faster training "
                              "steps)", negatable=True)
    compile: bool = opt(False, "torch.compile the model")
    sync_bn: bool = opt(False, "under torchrun: BatchNorm statistics over the global batch (SyncBatchNorm; CUDA "
                        "only); GhostModules then run the plain PyTorch path")
    dist_timeout: float = opt(600.0, "under torchrun: how long a rank waits for the others (set-up, each "
                              "all-reduce) before it fails, so that torchrun --max-restarts can restart the group",
                              metavar="SECONDS")
    scale_lr: bool = opt(False, "under torchrun: multiply --lr by the world size (linear scaling); default: lr "
                         "unchanged")


@dataclass
class DataConfig:
    img_size: int | list[int] = opt(227, "input size: S (S x S pixels) or WIDTHxHEIGHT, e.g. 128x96 to keep 4:3 "
                                    "photos' shape", parse=ImageSize.parse)
    crop_bbox: bool = opt(False, "crop each image to its car's bounding box")
    bbox_margin: float = opt(0.0, "box margin, fraction of box size per side")
    erase_background: bool = opt(False, "black out everything outside the box")
    grayscale: bool = opt(False, "one-channel images")
    no_normalize: bool = opt(False, "only scale to [0, 1]")
    mean: list[float] | None = opt(None, "normalization mean (default: the study's)", nargs="+")
    std: list[float] | None = opt(None, "normalization std (default: the study's)", nargs="+")
    val_split: float = opt(0.0, "hold out this stratified fraction of train as val (default 0: val = official test "
                           "split)")
    val_seed: int | None = opt(None, "seed of the --val-split draw (default: --seed); fix it to compare runs of "
                               "several seeds on the same held-out images")
    validate: bool = opt(True, "score the validation split after every epoch (the official test split unless "
                         "--val-split); --no-validate looks at no held-out image while training: no best.pt, no "
                         "early stopping, final.pt only (a campaign that scores the test split once, at the end)",
                         negatable=True)
    test_crop: float = opt(1.0, "validation, evaluation and prediction keep this fraction of each side around the "
                           "image's centre (1 = the whole image, the study's); training images stay whole",
                           metavar="FRACTION")
    train_decode_scale: float = opt(1.0, "training photos are decoded at this multiple of --img-size, so that each "
                                    "random resized crop is resampled down to --img-size, as sharp as the test photos, "
                                    "not up from a whole photo already shrunk to it (1 = at --img-size; needs "
                                    "resized_crop)", metavar="FACTOR")


@dataclass
class AugmentConfig:
    augment: list[str] = opt(["flip", "affine", "jitter"], f"train-time augmentations: {' '.join(AUG_NAMES)}, or "
                             "none (default: flip affine jitter, the study's best)", nargs="+", metavar="NAME")
    flip_p: float = opt(0.5, "horizontal flip probability")
    degrees: float = opt(25.0, "affine rotation range +-degrees")
    translate: list[float] = opt([0.1, 0.1], "affine max shift (fraction) x [y]", nargs="+")
    scale: list[float] = opt([0.9, 1.1], "affine scale range", nargs=2)
    shear: list[float] = opt([8.0], "affine shear: d | xmin xmax | x0 x1 y0 y1", nargs="+")
    jitter: list[float] = opt([0.2, 0.2, 0.2, 0.1], "colour jitter brightness contrast saturation hue", nargs=4,
                              metavar=("B", "C", "S", "H"))
    rotation_degrees: float = opt(15.0, "'rotation' range +-degrees")
    perspective_scale: float = opt(0.5, "'perspective' distortion scale")
    perspective_p: float = opt(0.5, "'perspective' probability")
    crop_scale: list[float] = opt([0.08, 1.0], "'resized_crop' area range", nargs=2)
    crop_ratio: list[float] = opt([3 / 4, 4 / 3], "'resized_crop' aspect range (width/height), relative to the "
                                  "input's shape: 1 keeps it", nargs=2)
    interpolation: str = opt("auto", "geometric resampling (auto: torchvision's default of each op; nearest for "
                             "flip+affine)", choices=("auto", "nearest", "bilinear"))
    erase: bool = opt(False, "random erasing after normalization")
    erase_p: float = opt(0.5, "random erasing probability")
    erase_scale: list[float] = opt([0.02, 0.33], "random erasing area range", nargs=2)
    erase_ratio: list[float] = opt([0.3, 3.3], "random erasing aspect range", nargs=2)
    erase_value: float = opt(0.0, "erased value (after normalization: 0 = mean)")


SECTIONS: dict[str, type] = {"run": RunConfig, "model": ModelConfig, "train": TrainConfig, "data": DataConfig,
                             "augment": AugmentConfig}


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain types only (lists, not tuples), as config.json, YAML and checkpoints keep it."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def flat(self) -> dict[str, Any]:
        return {k: v for sec in self.to_dict().values() for k, v in sec.items()}

    def updated(self, values: dict[str, Any]) -> Config:
        """A copy with flat key -> value changes (keys and types already checked)."""
        out = {name: dict(sec) for name, sec in self.to_dict().items()}
        for k, v in values.items():
            out[SECTION_OF[k]][k] = v
        return Config(**{name: SECTIONS[name](**sec) for name, sec in out.items()})


def _fields(section: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(section)}


SECTION_OF: dict[str, str] = {k: name for name, cls in SECTIONS.items() for k in _fields(cls)}
_HINTS: dict[str, Any] = {k: v for cls in SECTIONS.values() for k, v in typing.get_type_hints(cls).items()}
_META: dict[str, dict] = {k: dict(f.metadata) for cls in SECTIONS.values() for k, f in _fields(cls).items()}


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


# ----------------------------------------------------------------------------------------------------------
# values: one check for YAML, JSON and the command line

def _type_name(t: Any) -> str:
    if typing.get_origin(t) in (typing.Union, type(int | None)):
        return " or ".join(_type_name(a) for a in typing.get_args(t))
    if typing.get_origin(t) is list:
        return f"a list of {_type_name(typing.get_args(t)[0])}"
    return {type(None): "null"}.get(t, getattr(t, "__name__", str(t)))


def _coerce(t: Any, v: Any) -> Any:
    """v as type t, or raise TypeError. An int is a float; a bool is neither; a tuple is a list."""
    origin = typing.get_origin(t)
    if origin in (typing.Union, type(int | None)):
        for a in typing.get_args(t):
            try:
                return _coerce(a, v)
            except TypeError:
                pass
        raise TypeError
    if origin is list:
        if not isinstance(v, (list, tuple)):
            raise TypeError
        return [_coerce(typing.get_args(t)[0], x) for x in v]
    if t is type(None) and v is None:
        return None
    if t is bool and isinstance(v, bool):
        return v
    if t is int and isinstance(v, int) and not isinstance(v, bool):
        return v
    if t is float and isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    if t is float and isinstance(v, str):  # PyYAML (YAML 1.1) reads 5e-3, without a dot, as a string
        try:
            return float(v)
        except ValueError:
            raise TypeError from None
    if t is str and isinstance(v, str):
        return v
    raise TypeError


def check_value(key: str, value: Any, src: str) -> Any:
    """The value of `key` as its field's type, or a ConfigError naming src, the key and the expected type."""
    meta = _META[key]
    where = f"{src}: {SECTION_OF[key]}.{key}"
    if "parse" in meta and isinstance(value, str):  # e.g. img_size "160x80"
        try:
            value = meta["parse"](value)
        except argparse.ArgumentTypeError as e:
            raise ConfigError(f"{where}: {e}") from None
    if key == "img_size":
        try:
            return ImageSize.of(value).json()
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected an image size (S, 'WIDTHxHEIGHT' or [height, width]), "
                              f"got {value!r}") from None
    try:
        value = _coerce(_HINTS[key], value)
    except TypeError:
        raise ConfigError(f"{where}: expected {_type_name(_HINTS[key])}, got {value!r}") from None
    choices = meta.get("choices")
    if choices == "recipes":
        choices = recipe_names()
    if choices and value not in choices:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(choices)}")
    n = meta.get("nargs")
    if isinstance(n, int) and isinstance(value, list) and len(value) != n:
        raise ConfigError(f"{where}: expected {n} values, got {len(value)}")
    return value


def _closest(key: str, known: list[str]) -> str:
    initials = "".join(w[:1] for w in key.lower().split("_"))  # learning_rate -> lr, weight_decay -> wd
    near = [k for k in known if k == initials] or difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    return f"; did you mean '{near[0]}'?" if near else f"; valid keys: {', '.join(known)}"


# ----------------------------------------------------------------------------------------------------------
# files: YAML recipes, a run's config.json (either schema), a checkpoint's config

def parse_nested(doc: Any, src: str) -> dict[str, Any]:
    """{section: {key: value}} -> checked flat {key: value}; unknown sections and keys name the closest one."""
    if not isinstance(doc, dict):
        raise ConfigError(f"{src}: expected sections ({', '.join(SECTIONS)}) of key: value pairs, "
                          f"got {type(doc).__name__}")
    out: dict[str, Any] = {}
    for section, values in doc.items():
        if section not in SECTIONS:
            if section in SECTION_OF:
                raise ConfigError(f"{src}: '{section}' belongs under '{SECTION_OF[section]}:'; indent it there")
            raise ConfigError(f"{src}: unknown section '{section}'{_closest(str(section), list(SECTIONS))}")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{src}: section '{section}' must hold key: value pairs, got {values!r}")
        known = list(_fields(SECTIONS[section]))
        for key, v in values.items():
            if key not in known:
                if key in SECTION_OF:
                    raise ConfigError(f"{src}: {section}.{key}: '{key}' belongs in section '{SECTION_OF[key]}'")
                raise ConfigError(f"{src}: unknown key '{key}' in section '{section}'{_closest(str(key), known)}")
            out[key] = check_value(key, v, src)
    return out


def parse_flat(options: dict, src: str) -> dict[str, Any]:
    """The flat form of older config.json files and checkpoints (argparse's names); keys this code no
    longer has are dropped, the rest are checked."""
    return {k: check_value(k, v, src) for k, v in options.items() if k in SECTION_OF}


def from_saved(saved: dict, src: str) -> Config:
    """The Config a checkpoint or config.json recorded: nested (this code) or flat (older runs)."""
    values = parse_nested(saved, src) if set(saved) <= set(SECTIONS) else parse_flat(saved, src)
    return Config().updated(values)


def read_file(path: str | Path) -> dict[str, Any]:
    """A YAML recipe or a run's config.json -> checked flat {key: value}. A config.json replays its run:
    every option but the run's name (a replay is a new run)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such config file; pass a YAML recipe (e.g. recipes/fast.yaml) or a run's "
                          f"config.json")
    try:
        doc = yaml.safe_load(p.read_text())
    except (yaml.YAMLError, UnicodeDecodeError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{p}: not a readable YAML file ({first}); fix its syntax") from None
    if doc is None:
        return {}
    if isinstance(doc, dict) and isinstance(doc.get("config"), dict):  # a run folder's config.json
        values = parse_nested(doc["config"], str(p))
    elif isinstance(doc, dict) and isinstance(doc.get("options"), dict):  # config.json of older code: flat
        values = parse_flat(doc["options"], str(p))
    else:
        return parse_nested(doc, str(p))
    return {k: v for k, v in values.items() if k not in RUN_IDENTITY}


def jsonable(v: Any) -> Any:
    """Plain JSON types: paths as text, tuples as lists."""
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    return v


class _Dumper(yaml.SafeDumper):
    pass


# sections as blocks, one option a line; lists inline ([67, 82, 95, 107]), as the recipes are written
_Dumper.add_representer(list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))


def to_yaml(cfg: Config) -> str:
    """The configuration as a recipe file is written: it loads back as --config. A non-square img_size is
    written WIDTHxHEIGHT, as --img-size and the recipes take it, not as JSON's [height, width]."""
    sections = cfg.to_dict()
    data = sections[SECTION_OF["img_size"]]
    size = ImageSize.of(data["img_size"])
    data["img_size"] = size.json() if size.square else size.text
    return yaml.dump(sections, Dumper=_Dumper, sort_keys=False, width=110)


# ----------------------------------------------------------------------------------------------------------
# the command line, generated from the fields

class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    pass


def _add_option(g: argparse._ArgumentGroup, key: str, f: dataclasses.Field) -> None:
    meta, hint, default = f.metadata, _HINTS[key], Config().flat()[key]
    help_text = meta["help"]
    if default not in (None, False) and not meta.get("hidden"):
        shown = " ".join(map(str, default)) if isinstance(default, list) else default
        help_text += f" (default: {shown})"
    kw: dict[str, Any] = {"help": argparse.SUPPRESS if meta.get("hidden") else help_text}
    if "metavar" in meta:
        kw["metavar"] = meta["metavar"]
    if meta.get("negatable"):
        kw["action"] = argparse.BooleanOptionalAction
    elif hint is bool:
        kw["action"] = "store_true"
    else:
        base = hint
        if typing.get_origin(hint) in (typing.Union, type(int | None)):  # X | None: the flag takes an X
            base = [a for a in typing.get_args(hint) if a is not type(None)][0]
        if typing.get_origin(base) is list:
            kw["nargs"] = meta.get("nargs", "+")
            base = typing.get_args(base)[0]
        kw["type"] = meta.get("parse", base if base in (int, float, str) else str)
        choices = meta.get("choices")
        if choices:
            kw["choices"] = recipe_names() if choices == "recipes" else list(choices)
    g.add_argument("--" + key.replace("_", "-"), **kw)


def build_parser(description: str) -> argparse.ArgumentParser:
    """Every field as a flag; defaults are SUPPRESSed, so parse_args returns only what was given."""
    p = argparse.ArgumentParser(description=description, formatter_class=_HelpFormatter,
                                argument_default=argparse.SUPPRESS)
    g = p.add_argument_group("configuration files")
    g.add_argument("--config", action="append", metavar="FILE",
                   help="a YAML recipe (recipes/*.yaml) or a run's config.json to replay; several allowed, later "
                        "files win; flags given explicitly win over them")
    g.add_argument("--print-config", action="store_true", help="print the resolved configuration as YAML and exit")
    for name, cls in SECTIONS.items():
        g = p.add_argument_group(name)
        for key, f in _fields(cls).items():
            _add_option(g, key, f)
    return p


@dataclass
class CommandLine:
    cfg: Config
    explicit: set[str]  # the options given as flags (what --resume may override)
    config_files: list[str]
    print_config: bool


def from_command_line(argv: list[str] | None, description: str = "") -> CommandLine:
    """defaults <- recipes/<--recipe>.yaml <- recipes/demo.yaml (with --demo) <- --config files in order <-
    the flags given. Raises ConfigError."""
    given = vars(build_parser(description).parse_args(argv))
    files = given.pop("config", None) or []
    print_config = given.pop("print_config", False)
    explicit = {k: check_value(k, v, "command line") for k, v in given.items()}
    overlays = [read_file(f) for f in files]
    cfg = Config()
    if "recipe" in explicit:
        cfg = cfg.updated(read_file(RECIPES_DIR / f"{explicit['recipe']}.yaml"))
    if explicit.get("demo") or any(o.get("demo") for o in overlays):
        cfg = cfg.updated(read_file(RECIPES_DIR / "demo.yaml"))
    for o in overlays:
        cfg = cfg.updated(o)
    return CommandLine(cfg.updated(explicit), set(explicit), [str(f) for f in files], print_config)


def check(cfg: Config) -> None:
    """Fail fast, before any data is decoded, on options that can't work."""
    from model import ARCHS  # imported here: the model (and torch) are not needed to read a config
    t = cfg.train
    if cfg.model.arch not in ARCHS:
        raise ConfigError(f"unknown arch {cfg.model.arch!r}; choose one of: {', '.join(ARCHS)}")
    for k in ("batch_size", "epochs"):
        if getattr(t, k) < 1:
            raise ConfigError(f"--{k.replace('_', '-')} must be at least 1 (got {getattr(t, k)})")
    d = cfg.data
    if not 1 <= d.train_decode_scale <= 4:
        raise ConfigError(f"--train-decode-scale must lie in [1, 4] (got {d.train_decode_scale:g})")
    if d.train_decode_scale != 1 and "resized_crop" not in cfg.augment.augment:
        raise ConfigError(f"--train-decode-scale {d.train_decode_scale:g} needs the resized_crop augmentation (it "
                          f"resamples the larger photos to --img-size); add it to --augment or use 1")
    if not 0 <= t.label_smoothing < 1:
        raise ConfigError(f"--label-smoothing must lie in [0, 1) (got {t.label_smoothing})")
    if not 0 <= cfg.model.dropout < 1:
        raise ConfigError(f"--dropout must lie in [0, 1) (got {cfg.model.dropout})")
    if not 0 <= t.ema < 1:
        raise ConfigError(f"--ema must lie in [0, 1), e.g. 0.999 (got {t.ema}); 0 turns it off")
    if not cfg.data.validate and (t.patience or t.scheduler == "plateau"):
        raise ConfigError(f"--no-validate: nothing to stop early or to plateau on; pass --patience 0 (got "
                          f"{t.patience}) and a scheduler other than plateau (got {t.scheduler})")
    if t.warmup_epochs < 0 or (t.warmup_epochs and t.scheduler in PER_EPOCH_SCHEDULES):
        raise ConfigError(f"--warmup-epochs {t.warmup_epochs:g} needs a per-step --scheduler (cosine, linear or "
                         f"none), not {t.scheduler}, and must not be negative")
