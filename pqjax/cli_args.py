"""The `pqjax` command's arguments: the parser, and the checks that run before any model loads.

    parser = build_parser()
    args = parser.parse_args(argv)       # UsageError on a malformed argument
    check(args)                          # UsageError on a bad value; nothing loaded or written

`check` fills in what the commands use: `args.config` (a checked QuantConfig),
`args.calib_prompt_list`, `args.image_paths` (where `generate` writes).
"""

from __future__ import annotations

import argparse
import math
import os
from importlib import metadata
from pathlib import Path

from pqjax.checkpoint import META
from pqjax.cli_images import UsageError, image_paths

BACKENDS = ("xla", "xla_packed", "pallas")
ACTS_16BIT = ("none", "16", "bf16")
BACKEND_HELP = "the kernels: pallas needs a CUDA GPU (elsewhere XLA serves, with a warning)"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints the whole usage; one line is enough
        raise UsageError(f"{message} (see {self.prog} --help)")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Every option's default in its help, unless it is a flag's False or says it itself."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unset = action.default is None or action.default is False
        if unset or action.default == argparse.SUPPRESS or "default" in text:
            return text
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return f"{text} (default: %(default)s)".strip()
        return text


# argument types: each refuses a bad value with the argument's name in the message


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be >= 1")
    return value


def byte_count(text: str) -> int:
    """A memory budget: bytes, or a size such as 16GiB / 24GB."""
    from pqjax.pipelines.components import parse_bytes

    try:
        return parse_bytes(text, "the budget")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


MAX_MEMORY_HELP = ("a memory budget such as 16GiB: where the pipeline's weights exceed it, the "
                   "text encoders load for each encoding and are released before sampling")


def seed_int(text: str) -> int:
    """Any non-negative integer; seeds of 2**32 and above keep their high bits (seed_key)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be >= 0")
    return value


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r}: must be a finite number")
    return value


def guidance_float(text: str) -> float:
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be >= 0")
    return value


def alpha_values(text: str) -> float | tuple[float, ...]:
    """'0.5' or '0.3,0.5,0.7': each a number in [0, 1]."""
    values = tuple(finite_float(a.strip()) for a in text.split(","))
    bad = [a for a in values if not 0 <= a <= 1]
    if bad:
        raise argparse.ArgumentTypeError(f"{text!r}: each value must be in [0, 1]")
    return values if len(values) > 1 else values[0]


def _criterion_type(known: list[str]):
    def criterion(text: str) -> str | tuple[str, ...]:
        names = tuple(n.strip() for n in text.split(","))
        bad = [n for n in names if n not in known]
        if bad:
            raise argparse.ArgumentTypeError(
                f"unknown criterion {bad[0]!r}; choose from {', '.join(known)}"
            )
        return names if len(names) > 1 else names[0]

    return criterion


def version() -> str:
    try:
        return metadata.version("pqjax")
    except metadata.PackageNotFoundError:
        return "unknown"


# the parser


EXAMPLES = {
    "demo": "example: pqjax demo --out runs/demo",
    "quantize": "example: pqjax quantize tiny-flux-digits --weights int4 --group 64 "
    "--method permuquant --out runs/q",
    "generate": 'example: pqjax generate runs/q "a handwritten digit 7" "3" --out digits/',
    "report": "example: pqjax report runs/q",
}


def _sub(sub, name: str, summary: str) -> argparse.ArgumentParser:
    p = sub.add_parser(
        name, help=summary, description=summary, epilog=EXAMPLES[name], formatter_class=_Formatter
    )
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    p.add_argument(
        "--no-compile-cache",
        action="store_true",
        help="do not use the persistent jax compilation cache (also: PQJAX_COMPILE_CACHE=0)",
    )
    return p


def _add_size_args(p: argparse.ArgumentParser, what: str) -> None:
    """--steps, --height, --width (None: the model's own)."""
    what = f" {what}" if what else ""
    p.add_argument("--steps", type=positive_int, default=None,
                   help=f"sampling steps{what} (default: the model's)")
    p.add_argument("--height", type=positive_int, default=None,
                   help=f"image height{what} in pixels (default: the model's)")
    p.add_argument("--width", type=positive_int, default=None,
                   help=f"image width{what} in pixels (default: the model's)")


def _add_quant_args(p: argparse.ArgumentParser) -> None:
    from pqjax import formats
    from pqjax.methods import method_names
    from pqjax.permute.criteria import criterion_names

    names = formats.names()
    p.add_argument(
        "--weights",
        default="nvfp4",
        choices=names,
        metavar="FORMAT",
        help=f"weight format, one of: {', '.join(names)}",
    )
    p.add_argument(
        "--acts",
        default="same",
        choices=["same", *names, *ACTS_16BIT],
        metavar="FORMAT",
        help="activation format; 'same': the weights' format; none: 16-bit",
    )
    p.add_argument(
        "--group",
        type=positive_int,
        default=None,
        help="group size for INT formats (None: the format's own)",
    )
    methods = method_names()
    p.add_argument(
        "--method",
        default="permuquant",
        choices=methods,
        metavar="METHOD",
        help=f"one of: {', '.join(methods)}",
    )
    crits = criterion_names()
    p.add_argument(
        "--criterion",
        default="joint_second_moment",
        type=_criterion_type(crits),
        help=f"one or several (comma-separated) of: {', '.join(crits)}",
    )
    p.add_argument(
        "--alpha",
        default=0.5,
        type=alpha_values,
        help="exponent of the activation term in [0, 1], or several, comma-separated",
    )
    p.add_argument(
        "--tau",
        type=finite_float,
        default=0.0,
        help="accept an order when it lowers the layer error by more than tau",
    )
    p.add_argument("--backend", default="xla", choices=BACKENDS, help=BACKEND_HELP)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="pqjax",
        description="PermuQuant post-training quantization of diffusion transformers.",
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"pqjax {version()}")
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    p = _sub(sub, "demo", "the main job on the embedded trained tiny FLUX, with a report")
    p.add_argument("--out", default="runs/demo", help="folder for the report and checkpoint")
    p.add_argument("--per-digit", type=positive_int, default=5, help="images per digit")
    p.add_argument(
        "--rows", type=positive_int, default=256, help="sampled calibration rows per layer"
    )

    p = _sub(sub, "quantize", "calibrate, permute, quantize and save a model as a checkpoint")
    p.add_argument(
        "model",
        nargs="?",
        default="tiny-flux-digits",
        help="a model name (flux-dev, ...) or a diffusers pipeline folder",
    )
    p.add_argument("--out", required=True, help="the checkpoint folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument(
        "--calib-prompts",
        metavar="FILE",
        help="a text file with one prompt per line (default: built-in prompts)",
    )
    p.add_argument(
        "--rows", type=positive_int, default=256, help="sampled calibration rows per layer"
    )
    p.add_argument("--no-compare", action="store_true", help="skip the image comparison")
    p.add_argument("--allow-pickle", action="store_true",
                   help="also load pickled .bin/.pt weights (torch, weights_only=True)")
    p.add_argument("--max-memory", type=byte_count, default=None, help=MAX_MEMORY_HELP)
    p.add_argument("--work-dir", metavar="DIR", default=None,
                   help="where a block-by-block run keeps finished blocks; rerun to resume "
                   "(default: a folder under ~/.cache/pqjax/work named by the arguments)")
    _add_size_args(p, "of calibration and comparison")
    _add_quant_args(p)

    p = _sub(sub, "generate", "generate images from a saved checkpoint, one per prompt")
    p.add_argument("checkpoint", help="a folder written by pqjax quantize")
    p.add_argument("prompt", nargs="+", help="one or more prompts, one image each")
    p.add_argument(
        "--out",
        default="images",
        help="a folder (one PNG per prompt), a pattern with {i} (e.g. img_{i}.png), "
        "a file for one prompt, or with --grid the joined image's file",
    )
    p.add_argument("--grid", action="store_true", help="join all images into one file")
    p.add_argument(
        "--scale", type=positive_int, default=1, help="nearest-neighbour upscale of each image"
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing image files")
    p.add_argument(
        "--seed",
        type=seed_int,
        default=0,
        help="any integer >= 0; image i's noise comes from (seed, i), all bits used",
    )
    _add_size_args(p, "")
    p.add_argument(
        "--guidance",
        type=guidance_float,
        default=None,
        help="guidance scale >= 0 (default: the model's)",
    )
    p.add_argument("--backend", default="xla", choices=BACKENDS, help=BACKEND_HELP)
    p.add_argument("--max-memory", type=byte_count, default=None, help=MAX_MEMORY_HELP)
    p.add_argument(
        "--progress",
        action="store_true",
        help="a bar over the sampling steps (its host callback keeps the sampling program "
        "out of the compile cache, so every call compiles it again)",
    )

    p = _sub(sub, "report", "print a checkpoint's quantization report")
    p.add_argument("checkpoint", help="a folder written by pqjax quantize")
    return parser


# the checks that need more than one argument, or the file system


def check(args: argparse.Namespace) -> None:
    """Every check that needs no model; raises UsageError."""
    {
        "demo": _check_demo,
        "quantize": _check_quantize,
        "generate": _check_generate,
        "report": _check_report,
    }[args.cmd](args)


def _check_demo(args: argparse.Namespace) -> None:
    _folder_out(Path(args.out))


def _folder_out(out: Path) -> None:
    """A folder to write (its missing parents are created): not a file, in a writable place."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder")
    existing = next(p for p in (out.resolve(), *out.resolve().parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise UsageError(f"--out {out}: {existing} is not a writable folder")


def _check_quantize(args: argparse.Namespace) -> None:
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise UsageError(f"--out {out} exists; add --overwrite to replace it")
    _folder_out(out)
    args.config = quant_config(args)
    args.calib_prompt_list = None
    if args.calib_prompts is not None:
        path = Path(args.calib_prompts)
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"--calib-prompts {path}: cannot be read ({e})") from e
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
        if not prompts:
            raise UsageError(f"--calib-prompts {path}: no prompts in the file (one per line)")
        args.calib_prompt_list = prompts
    from pqjax.pipelines.load import resolve_root

    try:
        resolve_root(args.model)
    except FileNotFoundError as e:
        raise UsageError(str(e)) from e


def quant_config(args: argparse.Namespace, method: str | None = None):
    """The QuantConfig of the quantize arguments (its own checks as UsageError)."""
    from pqjax.quantize import QuantConfig

    try:
        return QuantConfig(
            weights=args.weights,
            acts=None if args.acts in ACTS_16BIT else args.acts,
            group=args.group,
            method=method or args.method,
            criterion=args.criterion,
            alpha=args.alpha,
            tau=args.tau,
        )
    except ValueError as e:  # name the flag, not the field: QuantConfig.group -> --group
        raise UsageError(str(e).replace("QuantConfig.", "--")) from e


def _check_checkpoint(path: Path) -> None:
    if not (path / META).is_file():
        raise UsageError(f"{path} is not a pqjax checkpoint ({META} is missing)")


def _check_report(args: argparse.Namespace) -> None:
    root = Path(args.checkpoint)
    if not (root / "report" / "report.json").is_file():
        raise UsageError(f"{root}: no report/report.json (is this a pqjax checkpoint?)")


def _check_generate(args: argparse.Namespace) -> None:
    _check_checkpoint(Path(args.checkpoint))
    if any(not p.strip() for p in args.prompt):
        raise UsageError("an empty prompt was given")
    args.image_paths = image_paths(args.out, len(args.prompt), args.grid)
    if not args.overwrite:
        for path in args.image_paths:
            if path.exists():
                raise UsageError(f"--out: {path} exists; add --overwrite to replace it")
