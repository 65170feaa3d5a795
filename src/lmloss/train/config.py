"""The options of ``lmloss train``: one table that makes the flags, the config file and ``--help``.

Every option is a field of :class:`TrainConfig`. The command line flag is the field
name with dashes (``max_steps`` -> ``--max-steps``); a YAML or TOML config file uses
the field names as keys. Precedence: defaults < config file < flags.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from lmloss._spec import BACKENDS, DEFAULT_FOCAL_GAMMA, NORMALIZATIONS, TOKEN_LOSSES

__all__ = ["DataSource", "TrainConfig", "add_arguments", "config_from_args", "load_config_file", "parse_data_source"]

BUILTIN_MODELS = ("tiny", "small")
BUILTIN_DATA_EPOCHS = 15.0  # the built-in set is small and regular: 15 passes take about a minute
DEFAULT_EPOCHS = 3.0
PRECISIONS = ("float32", "bfloat16")
MASKING = ("assistant", "all", "last_assistant", "everything")
# The per-token loss options (lmloss._spec.LossSpec) that are not flags, and why.
LOSS_OPTIONS_FIXED = {
    "shift": "a causal LM's labels are its input ids: always shifted",
    "ignore_index": "the collators mark untrained positions with -100",
    "reduction": "a step's loss is the mean over its targets",
}


def _meta(
    help: str, *, group: str, choices: Sequence[Any] | None = None, metavar: str | None = None, math_: bool = True
) -> dict[str, Any]:
    """A config field's metadata: its help text and flag. ``math_``: changing it changes what
    is computed (so a resumed run must not change it)."""
    return {"help": help, "group": group, "choices": choices, "metavar": metavar, "math": math_}


def _opt(
    default: Any,
    help: str,
    *,
    group: str,
    choices: Sequence[Any] | None = None,
    metavar: str | None = None,
    math_: bool = True,
) -> Any:
    """A config field with an immutable default and its help text (list fields: ``field(default_factory=list,
    metadata=_meta(...))``, so each config gets its own list)."""
    if isinstance(default, (list, dict, set)):
        raise TypeError(f"_opt takes an immutable default, got {default!r}; use field(default_factory=...)")
    return field(default=default, metadata=_meta(help, group=group, choices=choices, metavar=metavar, math_=math_))


@dataclass(frozen=True)
class DataSource:
    """One JSONL file and its mix weight: how many times each sample is seen per epoch
    (2.0: twice; 0.5: a random half, drawn again every epoch)."""

    path: str
    weight: float = 1.0


@dataclass
class TrainConfig:
    """Everything a run needs. ``lmloss train --help`` lists the same, by group."""

    # --- model and data
    model: str = _opt(
        "small",
        "a built-in size (tiny, small: a Qwen2 model with random weights and a BPE tokenizer "
        "trained on the data) or a local transformers model directory (model and tokenizer; "
        "nothing is downloaded)",
        group="model and data",
        metavar="SIZE|DIR",
    )
    data: list[str] = field(
        default_factory=list,
        metadata=_meta(
            "JSONL training files, each PATH or PATH:WEIGHT (samples in 'messages' chat format or 'prompt'/'completion' "
            "format; WEIGHT = times each sample is seen per epoch, default 1); none: the built-in chat data set",
            group="model and data",
            metavar="PATH[:W]",
        ),
    )
    eval_data: list[str] = field(
        default_factory=list,
        metadata=_meta(
            "JSONL files held out for evaluation (default: --eval-fraction of --data)",
            group="model and data",
            metavar="PATH",
        ),
    )
    eval_fraction: float | None = _opt(
        None,
        "fraction of each training file held out for evaluation (default 0.05; 0 when --eval-data is given)",
        group="model and data",
        metavar="F",
    )
    vocab_size: int = _opt(512, "vocabulary of the tokenizer trained for a built-in model", group="model and data")
    masking: str = _opt(
        "assistant",
        "which chat tokens are trained: assistant (every assistant turn), all (every "
        "turn), last_assistant (the last assistant turn), everything (the whole text; also "
        "trains prompts of prompt/completion samples)",
        group="model and data",
        choices=MASKING,
    )
    train_on_prompt: bool = _opt(
        False, "train on prompts too (the same as --masking everything)", group="model and data"
    )
    train_turn_suffix: bool = _opt(
        False,
        "also train what the chat template writes after each trained turn's "
        "end-of-turn token (the newline after <|im_end|> in ChatML), as LLaMA-Factory's "
        "templates do: the labels of a LLaMA-Factory recipe, token for token (chat "
        "samples; lmloss check takes the same flag)",
        group="model and data",
    )
    max_length: int = _opt(
        256, "tokens per sample (longer ones are truncated; reported) and per packed row", group="model and data"
    )
    skip_bad_samples: bool = _opt(
        False,
        "skip samples that cannot be encoded (unknown role, no assistant turn...) "
        "and report them, instead of stopping with an error",
        group="model and data",
    )
    # --- batches and steps
    batch_size: int = _opt(8, "samples per micro-batch (see --batch-tokens)", group="batches and steps")
    batch_tokens: int | None = _opt(
        None,
        "tokens per micro-batch instead of a sample count (samples are added until the next one would not fit)",
        group="batches and steps",
        metavar="N",
    )
    grad_accum: int = _opt(
        4,
        "micro-batches per optimizer step (per process under torchrun); the loss of each "
        "is divided by the target count of the whole step",
        group="batches and steps",
    )
    packing: bool = _opt(
        True,
        "pack samples into rows of --max-length (boundaries never leak into the loss); --no-packing pads instead",
        group="batches and steps",
    )
    max_steps: int | None = _opt(
        None, "optimizer steps to run (conflicts with --epochs)", group="batches and steps", metavar="N"
    )
    epochs: float | None = _opt(
        None,
        "passes over the training data (when --max-steps is not given; default 3, "
        "or 15 on the small built-in data set)",
        group="batches and steps",
        metavar="E",
    )
    seed: int = _opt(0, "seed of the initialisation, the split and the data order", group="batches and steps")
    # --- optimizer
    lr: float = _opt(3e-3, "peak learning rate of AdamW", group="optimizer")
    weight_decay: float = _opt(0.01, "AdamW weight decay (not applied to biases and norms)", group="optimizer")
    warmup_steps: int | None = _opt(
        None, "linear warm-up steps (default: 5%% of the steps)", group="optimizer", metavar="N"
    )
    min_lr_ratio: float = _opt(0.1, "the cosine decay ends at this fraction of --lr", group="optimizer")
    max_grad_norm: float | None = _opt(
        1.0, "clip the gradient norm to this (0 or none: no clipping)", group="optimizer"
    )
    # --- loss
    label_smoothing: float = _opt(0.0, "label smoothing in [0, 1]", group="loss")
    z_loss: float = _opt(
        0.0,
        "z-loss coefficient (adds c * logsumexp^2 per target; its share of the loss is "
        "logged as train/z_loss, for one more forward of the output layer per micro-batch)",
        group="loss",
    )
    softcap: float | None = _opt(None, "tanh soft-capping of the logits (Gemma 2 uses 30)", group="loss", metavar="S")
    normalize: str = _opt(
        "token",
        "token: mean over the step's target tokens; sequence: mean of per-sequence means",
        group="loss",
        choices=NORMALIZATIONS,
    )
    token_loss: str = _opt(
        "ce",
        "ce: cross-entropy; dft: scaled by the detached target probability; focal: "
        "scaled by the detached (1 - p)^gamma; focal_attached: focal loss of Lin et al.",
        group="loss",
        choices=TOKEN_LOSSES,
    )
    focal_gamma: float | None = _opt(
        None, f"gamma of --token-loss focal (default {DEFAULT_FOCAL_GAMMA:g})", group="loss", metavar="G"
    )
    loss_backend: str = _opt(
        "auto",
        "linear cross-entropy backend (auto: reference for small logits, else chunked; triton, triton-lowmem: CUDA)",
        group="loss",
        choices=BACKENDS,
    )
    chunk_size: int | None = _opt(
        None, "rows per chunk of the fused loss (default: from a memory budget)", group="loss", metavar="N"
    )
    # --- hardware
    device: str = _opt(
        "auto",
        "cpu, cuda, cuda:N, or auto (cuda if available); under torchrun each process takes cuda:LOCAL_RANK",
        group="hardware",
        math_=False,
    )
    precision: str = _opt(
        "float32",
        "float32, or bfloat16 autocast (weights and optimizer stay float32)",
        group="hardware",
        choices=PRECISIONS,
    )
    # --- run directory, evaluation, checkpoints
    output_dir: str = _opt(
        "runs/train",
        "the run directory: config, metrics.jsonl, plots/, checkpoints/, summary.json, report.md",
        group="run directory",
        math_=False,
    )
    resume: bool = _opt(
        False,
        "continue the run in --output-dir from its last complete checkpoint (same losses as an uninterrupted run)",
        group="run directory",
        math_=False,
    )
    overwrite: bool = _opt(
        False, "delete an existing run in --output-dir instead of refusing to start", group="run directory", math_=False
    )
    eval_every: int = _opt(50, "evaluate every N steps (and at the end)", group="run directory", math_=False)
    save_every: int = _opt(100, "checkpoint every N steps (and at the end)", group="run directory", math_=False)
    keep_checkpoints: int = _opt(
        2, "complete checkpoints to keep (older ones are deleted)", group="run directory", math_=False
    )
    samples: int = _opt(
        3, "prompts to answer with greedy generation before and after training", group="run directory", math_=False
    )
    max_new_tokens: int = _opt(24, "tokens per generated answer", group="run directory", math_=False)
    progress: str = _opt(
        "auto",
        "progress display: auto, rich, tqdm, plain, none",
        group="run directory",
        choices=("auto", "rich", "tqdm", "plain", "none"),
        math_=False,
    )

    def __post_init__(self) -> None:
        if self.max_grad_norm == 0:
            self.max_grad_norm = None  # "0 or none: no clipping" (clipping to 0 would zero every gradient)
        check_config(self)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def sources(self) -> list[DataSource]:
        return [parse_data_source(text) for text in self.data]

    @property
    def held_out_fraction(self) -> float:
        if self.eval_fraction is not None:
            return self.eval_fraction
        return 0.0 if self.eval_data else 0.05

    @classmethod
    def from_values(cls, values: Mapping[str, Any], where: str = "options") -> TrainConfig:
        """A config from a mapping of option names (a config file, saved ``config.json``),
        with each value converted to its option's type or a clear error."""
        known = {f.name: f for f in fields(cls)}
        converted: dict[str, Any] = {}
        for name, value in values.items():
            if name not in known:
                raise ValueError(f"{where}: unknown option {name!r}; known options: {', '.join(sorted(known))}")
            converted[name] = _coerce(value, str(known[name].type), f"{where}: {name}")
        return cls(**converted)


def _coerce(value: Any, kind: str, where: str) -> Any:
    """``value`` as the type named by ``kind`` (a field annotation string)."""
    if value is None and "None" in kind:
        return None
    base = kind.replace(" | None", "")
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if base == "bool" and isinstance(value, bool):
        return value
    if base == "int" and number and isinstance(value, int):
        return value
    if base == "float" and number:
        return float(value)
    if base == "str" and isinstance(value, str):
        return value
    if base.startswith("list") and isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ValueError(
        f"{where} must be {'a list of strings' if base.startswith('list') else 'a ' + base}"
        f"{' or null' if 'None' in kind else ''}, got {value!r}"
    )


def parse_data_source(text: str) -> DataSource:
    """``PATH`` or ``PATH:WEIGHT`` (a trailing ``:number``; other colons stay in the path)."""
    path, sep, weight = str(text).rpartition(":")
    if sep and path:
        try:
            value = float(weight)
        except ValueError:
            return DataSource(str(text))
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"--data {text!r}: the weight after ':' must be a positive number, got {weight!r}")
        return DataSource(path, value)
    return DataSource(str(text))


# ------------------------------------------------------------------------------------ checks


def check_config(c: TrainConfig) -> None:
    """Reject impossible values and conflicting options with a message that says what to do."""
    _positive(
        c,
        "vocab_size",
        "max_length",
        "batch_size",
        "grad_accum",
        "eval_every",
        "save_every",
        "keep_checkpoints",
        "max_new_tokens",
    )
    _positive(c, "batch_tokens", "max_steps", "warmup_steps", "chunk_size", optional=True, zero_ok=("warmup_steps",))
    for name in ("samples",):
        if getattr(c, name) < 0:
            raise ValueError(f"--{_flag(name)} must be >= 0, got {getattr(c, name)}")
    if c.max_steps is not None and c.epochs is not None:
        raise ValueError("--max-steps and --epochs conflict: give one (steps win in other trainers; here you choose)")
    if c.epochs is not None and not (math.isfinite(c.epochs) and c.epochs > 0):
        raise ValueError(f"--epochs must be a positive number, got {c.epochs}")
    if c.eval_fraction is not None and not 0.0 <= c.eval_fraction < 1.0:
        raise ValueError(f"--eval-fraction must be in [0, 1), got {c.eval_fraction}")
    if c.eval_data and c.eval_fraction:
        raise ValueError("--eval-data and --eval-fraction conflict: held-out data comes from one of them")
    if not 0.0 <= c.label_smoothing <= 1.0:
        raise ValueError(f"--label-smoothing must be in [0, 1], got {c.label_smoothing}")
    for name in ("lr", "weight_decay", "z_loss", "focal_gamma", "min_lr_ratio"):
        value = getattr(c, name)
        if value is None:  # focal_gamma: the library's default
            continue
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"--{_flag(name)} must be a finite number >= 0, got {value}")
    if c.min_lr_ratio > 1:
        raise ValueError(f"--min-lr-ratio must be in [0, 1], got {c.min_lr_ratio}")
    if c.softcap is not None and not (math.isfinite(c.softcap) and c.softcap > 0):
        raise ValueError(f"--softcap must be a positive number, got {c.softcap}")
    if c.max_grad_norm is not None and not (math.isfinite(c.max_grad_norm) and c.max_grad_norm >= 0):
        raise ValueError(f"--max-grad-norm must be a finite number >= 0, got {c.max_grad_norm}")
    # An explicit default (saved by runs from before the default was None) is harmless.
    if c.focal_gamma not in (None, DEFAULT_FOCAL_GAMMA) and c.token_loss not in ("focal", "focal_attached"):
        raise ValueError("--focal-gamma is only used with --token-loss focal or focal_attached")
    if c.train_on_prompt and c.masking not in ("assistant", "everything"):
        raise ValueError(
            f"--train-on-prompt and --masking {c.masking} conflict: --train-on-prompt means --masking everything"
        )
    if c.resume and c.overwrite:
        raise ValueError("--resume and --overwrite conflict: resume continues the run, overwrite deletes it")
    for f in fields(c):
        choices = f.metadata.get("choices")
        if choices is not None and getattr(c, f.name) not in choices:
            raise ValueError(
                f"--{_flag(f.name)} must be one of {', '.join(map(str, choices))}; got {getattr(c, f.name)!r}"
            )
    for text in c.data:
        parse_data_source(text)


def _positive(c: TrainConfig, *names: str, optional: bool = False, zero_ok: Sequence[str] = ()) -> None:
    for name in names:
        value = getattr(c, name)
        if optional and value is None:
            continue
        low = 0 if name in zero_ok else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"--{_flag(name)} must be an integer >= {low}, got {value!r}")


def _flag(name: str) -> str:
    return name.replace("_", "-")


# ------------------------------------------------------------------------------ config file


def load_config_file(path: str | Path) -> dict[str, Any]:
    """The options in a YAML (``.yaml``/``.yml``), TOML (``.toml``) or JSON file.

    Keys are the option names with underscores or dashes (``max_steps`` or
    ``max-steps``). Unknown keys are an error that lists the known ones.
    """
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist")
    text = file.read_text(encoding="utf-8")
    suffix = file.suffix.lower()
    try:
        if suffix in (".yaml", ".yml"):
            import yaml

            values = yaml.safe_load(text)
        elif suffix == ".toml":
            values = _load_toml(text)
        elif suffix == ".json":
            values = json.loads(text)
        else:
            raise ValueError(f"config file {str(path)!r}: use a .yaml, .yml, .toml or .json file")
    except ValueError:
        raise
    except Exception as err:  # yaml.YAMLError and tomllib.TOMLDecodeError name the line
        raise ValueError(f"config file {str(path)!r} could not be parsed: {err}") from err
    if values is None:
        return {}
    if not isinstance(values, Mapping):
        raise ValueError(f"config file {str(path)!r} must hold a mapping of option names to values")
    return _normalize_keys(values, str(path))


def _load_toml(text: str) -> Any:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # Python 3.10: the backport, which lmloss[hf] installs there
        try:
            import tomli as tomllib
        except ModuleNotFoundError as err:
            raise ValueError("TOML config files need Python 3.11+ or `pip install tomli`; or use YAML") from err
    return tomllib.loads(text)


def _normalize_keys(values: Mapping[str, Any], where: str) -> dict[str, Any]:
    known = {f.name for f in fields(TrainConfig)}
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise ValueError(f"{where}: unknown option {key!r}; known options: {', '.join(sorted(known))}")
        if name in ("data", "eval_data") and isinstance(value, str):
            value = [value]
        if name == "data" and isinstance(value, list):
            value = [_source_text(v, where) for v in value]
        out[name] = value
    return out


def _source_text(value: Any, where: str) -> str:
    """A data entry of a config file: ``"path:w"`` or ``{"path": ..., "weight": ...}``."""
    if isinstance(value, Mapping):
        if "path" not in value:
            raise ValueError(f"{where}: a data entry needs a 'path', got {dict(value)}")
        return f"{value['path']}:{value.get('weight', 1.0)}"
    return str(value)


# -------------------------------------------------------------------------------- arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per field, grouped as in ``--help``; every default is SUPPRESS so that only
    the flags actually given override the config file."""
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help="YAML, TOML or JSON file of options (keys = option names); flags override it",
    )
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in fields(TrainConfig):
        group_name = f.metadata["group"]
        group = groups.get(group_name) or groups.setdefault(group_name, parser.add_argument_group(group_name))
        _add_flag(group, f)


def _add_flag(group: argparse._ArgumentGroup, f: Any) -> None:
    flag = f"--{_flag(f.name)}"
    default = f.default if f.default is not MISSING else f.default_factory()
    help_text = f.metadata["help"]
    if "default" not in help_text:  # some helps explain a default that depends on other options
        help_text += f" (default: {_show(default)})"
    common: dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS, help=help_text)
    kind = str(f.type)
    if kind == "bool":
        group.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
    elif kind.startswith("list"):
        group.add_argument(flag, nargs="+", metavar=f.metadata["metavar"] or "X", **common)
    else:
        convert = _converter(kind)
        group.add_argument(flag, type=convert, choices=f.metadata["choices"], metavar=f.metadata["metavar"], **common)


def _converter(kind: str) -> Any:
    base = kind.replace(" | None", "")
    convert = {"int": int, "float": float, "str": str}[base]
    if "None" not in kind:
        return convert

    def optional(text: str) -> Any:
        return None if text.lower() in ("none", "null") else convert(text)

    optional.__name__ = base  # argparse names the type in its error message
    return optional


def _show(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, list):
        return " ".join(value) if value else "none"
    return str(value)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults < the ``--config`` file < the flags given."""
    values = load_config_file(args.config) if "config" in args else {}
    values.update({k: v for k, v in vars(args).items() if k != "config"})
    where = f"config file {args.config!r}" if "config" in args else "options"
    return TrainConfig.from_values(values, where)


def given_options(args: argparse.Namespace) -> set[str]:
    """The option names set on the command line or in the config file (not defaults)."""
    names = {k for k in vars(args) if k != "config"}
    if "config" in args:
        names |= set(load_config_file(args.config))
    return names
