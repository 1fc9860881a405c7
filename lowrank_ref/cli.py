r"""The ``lowrank-ref`` command.

    lowrank-ref compare [--methods full,bitfit,lora] [--backend numpy] [--steps N] [--out DIR] [--quiet]
    lowrank-ref pretrain [--out DIR] [--steps N] [--quiet]
    lowrank-ref train --method M [--set KEY=VALUE ...] [--model builtin|hf:DIR] [--data builtin|FILE] ...
    lowrank-ref methods
    lowrank-ref --help

Bad arguments exit with status 2 and a message naming the argument (argparse's convention); a
``ValueError`` from the library (an unknown method, say) is printed as ``lowrank-ref: error: ...``
with the same status.
"""

from __future__ import annotations

import argparse
import sys
import time

__all__ = ["main", "build_parser"]


def positive_int(text: str) -> int:
    """An argparse type: a positive integer, or a clear usage error."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def positive_float(text: str) -> float:
    """An argparse type: a positive finite number, or a clear usage error."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return v


def build_parser() -> argparse.ArgumentParser:
    from lowrank_ref.experiments.compare import DEFAULTS, VARIANTS
    from lowrank_ref.registry import BACKENDS

    parser = argparse.ArgumentParser(
        prog="lowrank-ref",
        description="The LoRA family built twice (NumPy by hand, PyTorch), held together by tests. "
                    "`lowrank-ref compare` is the main job.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    c = sub.add_parser(
        "compare", help="fine-tune the shipped model on the dialect with each method and measure",
        description="Load the shipped pre-trained GPT; for each method inject it, fine-tune on the "
                    "built-in dialect, and measure trainable parameters, adapter file size, peak "
                    "memory, time per step, and next-token accuracy on the dialect (before, after) "
                    "and on held-out base-language text (after). Prints a table; with --out writes "
                    "DIR/compare.json and DIR/compare.png.")
    c.add_argument("--methods", default=None,
                   help=f"comma-separated method names (default: all of {', '.join(VARIANTS)})")
    c.add_argument("--backend", default="numpy", choices=[b for b in BACKENDS if b != "cupy"],
                   help="numpy (default, hand-written backward), torch (CPU) or cuda")
    c.add_argument("--steps", type=positive_int, default=DEFAULTS["steps"],
                   help=f"training steps per method (default {DEFAULTS['steps']})")
    c.add_argument("--batch-size", type=positive_int, default=DEFAULTS["batch_size"],
                   help=f"windows of 32 tokens per step (default {DEFAULTS['batch_size']})")
    c.add_argument("--lr-scale", type=positive_float, default=1.0,
                   help="multiply every method's learning rate (default 1)")
    c.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="adapter init and batch order")
    c.add_argument("--out", default="runs/compare", help="output directory (default runs/compare)")
    c.add_argument("--quiet", action="store_true", help="no progress bars")

    p = sub.add_parser(
        "pretrain", help="rebuild the shipped pre-trained model from its seed",
        description="Pre-train the small GPT on the built-in base language and write "
                    "gpt_base.safetensors and gpt_base.json (the same seed gives the same bytes).")
    p.add_argument("--out", default=None,
                   help="output directory (default: the package's assets folder, replacing the shipped model)")
    p.add_argument("--steps", type=positive_int, default=None, help="training steps (default: the shipped model's)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    from lowrank_ref.train_cli import add_train_parser

    add_train_parser(sub)
    sub.add_parser("methods", help="list the methods `compare` knows and the registered adapters")
    return parser


def _cmd_compare(args) -> int:
    from lowrank_ref.experiments.compare import check_methods, format_table, run_compare

    methods = check_methods(args.methods)  # fail before any work
    if args.backend in ("torch", "cuda"):
        from lowrank_ref.backend import torch_device

        try:
            torch_device(args.backend)  # torch installed? a GPU there for cuda?
        except (RuntimeError, ImportError) as e:
            raise ValueError(str(e)) from None
    t0 = time.perf_counter()
    rows = run_compare(methods=methods, backend=args.backend, steps=args.steps, out=args.out,
                       progress=not args.quiet, batch_size=args.batch_size, lr_scale=args.lr_scale,
                       seed=args.seed)
    wall = time.perf_counter() - t0
    print(format_table(rows))
    print(f"\n{len(rows)} method(s), {args.steps} steps each, backend {args.backend}: {wall:.1f} s. "
          f"Wrote {args.out}/compare.json and {args.out}/compare.png")
    return 0


def _cmd_pretrain(args) -> int:
    from lowrank_ref.models import ASSET_DIR, CONFIG_FILE, WEIGHTS_FILE, pretrain, shipped_settings

    out = ASSET_DIR if args.out is None else args.out
    settings = shipped_settings()  # rebuild what ships, unless told otherwise
    t0 = time.perf_counter()
    _, meta = pretrain(out=out, steps=args.steps, settings=settings, progress=not args.quiet)
    print(f"pre-trained {meta['settings']['steps']} steps in {time.perf_counter() - t0:.1f} s: "
          f"final loss {meta['final_loss']:.4f}, held-out accuracy base {meta['heldout']['base_accuracy']:.3f}, "
          f"dialect {meta['heldout']['dialect_accuracy']:.3f}")
    print(f"wrote {out}/{WEIGHTS_FILE} and {out}/{CONFIG_FILE}")
    return 0


def _cmd_train(args) -> int:
    from lowrank_ref.train_cli import run_train

    return run_train(args)


def _cmd_methods(args) -> int:
    from lowrank_ref import registry
    from lowrank_ref.experiments.compare import VARIANTS

    print("compare rows (lowrank-ref compare --methods ...):")
    for name, v in VARIANTS.items():
        print(f"  {name:10s} method={v.method}, config={v.config}, targets={v.targets}, lr={v.lr}")
    print("registered methods (lowrank_ref.registry):")
    for name in registry.method_names():
        print(f"  {name:10s} {registry.get_method(name).description}")
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    handler = {"compare": _cmd_compare, "pretrain": _cmd_pretrain, "train": _cmd_train, "methods": _cmd_methods}[args.command]
    try:
        return handler(args)
    except (ValueError, TypeError) as e:
        parser.exit(2, f"lowrank-ref: error: {e}\n")
    except OSError as e:  # e.g. pretrain into a read-only install: say where to write instead
        parser.exit(1, f"lowrank-ref: error: {e} (pass --out DIR to write elsewhere)\n")
    except KeyboardInterrupt:
        parser.exit(130, "lowrank-ref: interrupted\n")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
