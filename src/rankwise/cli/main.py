"""Entry point of the ``rankwise`` command.

Each verb lives in ``rankwise.cli.<verb>_cmd`` and provides
``add_arguments(parser)`` and ``run(args) -> int``. Verb modules are imported
only for the verb being run, so ``rankwise --help`` imports neither torch nor
transformers (tests/test_imports.py). Every verb gets ``--quiet`` here (no
progress bars, no messages on stderr; errors still print): it sets
``TQDM_DISABLE=1``, which rankwise's bars (:mod:`rankwise.progress`) and the
libraries' tqdm bars honour, and quiets the shared console. User errors
(:class:`RankwiseError`) print one line and exit with status 2; Ctrl-C exits
with 130 after the verb's own clean-up (outputs are written atomically).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from collections.abc import Iterator

from rankwise import __version__
from rankwise.errors import RankwiseError
from rankwise.progress import set_quiet

VERBS: dict[str, tuple[str, str]] = {
    "inspect": ("rankwise.cli.inspect_cmd", "per-matrix spectra and metrics: table, JSON, HTML report"),
    "compress": ("rankwise.cli.compress_cmd", "one-shot low-rank compression W ≈ B A of a trained model"),
    "eval": ("rankwise.cli.eval_cmd", "perplexity, size and speed of a dense or compressed model"),
    "tune": ("rankwise.cli.tune_cmd", "fine-tune with spectral adapters (lora, pissa, svfit, ...)"),
    "train": ("rankwise.cli.train_cmd", "train with low-rank optimisers (GaLore, DCT, Fira) and callbacks"),
    "quantize": ("rankwise.cli.quantize_cmd", "low-bit weights (RTN, GPTQ) with optional EoRA low-rank compensation"),
}


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (the message and a pointer to --help), not a usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help.\n")


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    parser = _Parser(
        prog="rankwise", description="See, use and train the low-rank structure of neural-network weights."
    )
    parser.add_argument("--version", action="version", version=f"rankwise {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for name, (module, help_text) in VERBS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if verb is None or verb == name:
            importlib.import_module(module).add_arguments(p)
        if "--quiet" not in p._option_string_actions:  # a verb that defines its own --quiet keeps it
            p.add_argument("--quiet", action="store_true",
                           help="no progress bars and no messages on stderr (errors still print); "
                                "TQDM_DISABLE=1 does the same for the bars")
    return parser


@contextlib.contextmanager
def _quiet_scope(on: bool) -> Iterator[None]:
    """``--quiet``: silence every bar (``TQDM_DISABLE=1``) and the shared console for one verb run.

    The environment and console are restored afterwards, so ``main()`` called in-process
    (tests, notebooks) leaves no trace.
    """
    if not on:
        yield
        return
    from rankwise.cli.common import console

    saved = {k: os.environ.get(k) for k in ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS")}
    was_quiet = console.quiet
    set_quiet(True)
    console.quiet = True
    # transformers' own bars ("Loading weights") pass disable= explicitly, so TQDM_DISABLE does not reach
    # them; every quiet verb loads a model anyway, so importing transformers here costs nothing extra
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is a hard dependency
        hf_logging = None
    hf_bars = hf_logging is not None and hf_logging.is_progress_bar_enabled()
    if hf_bars:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if hf_bars:
            hf_logging.enable_progress_bar()
        console.quiet = was_quiet
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class _OptionError(Exception):
    """A RankwiseError raised by an option's type, carried past argparse.

    RankwiseError is a ValueError, which argparse would swallow into a generic
    "invalid value" message plus a usage block; this is not a ValueError, so it
    reaches :func:`main`, which prints the type's own one-line message.
    """


def _strict_numbers(parser: argparse.ArgumentParser) -> None:
    """Parse every plain ``type=float`` / ``type=int`` option of every verb strictly.

    Floats must be finite (``--alpha inf``, ``--lr nan`` are errors), integers whole and 64-bit
    (``--seed 2**70`` is an error), as options built from config dataclasses already are.
    """
    from rankwise.config import finite_float, whole_int

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in set(action.choices.values()):
                _strict_numbers(sub)
        elif action.option_strings and action.type in (float, int):
            flag = max(action.option_strings, key=len)
            action.type = finite_float(flag) if action.type is float else whole_int(flag)


def _carry_type_errors(parser: argparse.ArgumentParser) -> None:
    """Wrap every option type of ``parser`` and its sub-parsers so RankwiseError becomes _OptionError."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in set(action.choices.values()):
                _carry_type_errors(sub)
        elif callable(action.type) and not getattr(action.type, "_rankwise_carried", False):
            action.type = _carrying(action.type)


def _carrying(type_func):
    def parse(value: str):
        try:
            return type_func(value)
        except RankwiseError as exc:
            raise _OptionError(str(exc)) from exc

    parse._rankwise_carried = True  # type: ignore[attr-defined]
    parse.__name__ = getattr(type_func, "__name__", "value")  # argparse names the type in its own errors
    return parse


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verb = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(verb if verb in VERBS else "__none__")
    _strict_numbers(parser)
    _carry_type_errors(parser)
    try:
        args = parser.parse_args(argv)
    except (_OptionError, RankwiseError) as exc:  # raised by argument types such as --ratio
        print(f"rankwise {verb}: error: {exc}", file=sys.stderr)
        return 2
    if args.verb is None:
        parser.print_help()
        return 0
    try:
        with _quiet_scope(bool(getattr(args, "quiet", False))), _sigterm_scope():
            return int(importlib.import_module(VERBS[args.verb][0]).run(args) or 0)
    except RankwiseError as exc:
        print(f"rankwise {args.verb}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the environment failed (disk, permissions, a vanished file): one line, not a traceback
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        print(f"rankwise {args.verb}: error: {exc.strerror or exc}{where}.", file=sys.stderr)
        return 2
    except _Terminated:
        print(f"rankwise {args.verb}: terminated (SIGTERM); no partial output was kept.", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print(f"rankwise {args.verb}: interrupted; no partial output was kept.", file=sys.stderr)
        return 130


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so every ``finally`` / atomic-output clean-up runs (rather than dying at once)."""


@contextlib.contextmanager
def _sigterm_scope() -> Iterator[None]:
    """Turn SIGTERM into :class:`_Terminated` for one verb run (main thread only); the old handler is restored."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise _Terminated

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


if __name__ == "__main__":
    raise SystemExit(main())
