"""``python -m gift_quant.recipe RECIPE.yaml [--set key.path=value ...] [--output-dir DIR] [--dry-run]``.

Every problem a user can fix (recipe, model, data) ends as one line on stderr and exit code 2; ``--debug`` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import yaml

from .config import Recipe
from .stages import parse_recipe, stage_name
from .errors import Interrupted, UserError

EXIT_USER_ERROR = 2


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML without silent surprises: a key given twice in one mapping is an error, not "the last one wins"."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key '{key}'", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


MAX_DEPTH = 32  # recipes are a few levels deep; far deeper nesting is a mistake (and could exhaust the stack)
MAX_VALUES = 100_000  # a recipe holds hundreds of values; YAML aliases can make billions out of a few lines


def parse_yaml(text: str, where: str) -> Any:
    """A YAML document with unique keys; every problem is one UserError line naming ``where``."""
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"{where}: invalid YAML{at}: {getattr(e, 'problem', None) or e}") from None
    except RecursionError:
        raise UserError(f"{where}: nested too deeply to be a recipe") from None
    _Shape(where).measure(data)
    return data


class _Shape:
    """Depth and number of values of a YAML document as its aliases expand it, measured once per shared node (so
    an alias bomb is measured, not walked); a node that contains itself is refused."""

    def __init__(self, where: str) -> None:
        self.where, self.seen, self.open = where, {}, set()

    def measure(self, node: Any, level: int = 0) -> tuple[int, int]:
        """(values, height) below ``node``, refusing more than MAX_VALUES values or MAX_DEPTH levels."""
        if not isinstance(node, (dict, list)):
            return 1, 0
        if id(node) not in self.seen:
            if id(node) in self.open:
                raise UserError(f"{self.where}: a YAML alias refers to the node that contains it; not a recipe")
            self.open.add(id(node))
            count, height = 1, 0
            for child in (node.values() if isinstance(node, dict) else node):
                n, h = self.measure(child, level + 1)
                count, height = count + n, max(height, h + 1)
                if count > MAX_VALUES:
                    raise UserError(f"{self.where}: expands to more than {MAX_VALUES:,} values (YAML aliases?); not "
                                    f"a recipe")
            self.open.discard(id(node))
            self.seen[id(node)] = count, height
        count, height = self.seen[id(node)]
        if level + height > MAX_DEPTH:  # an alias may put a shallow anchor deep down
            raise UserError(f"{self.where}: nested more than {MAX_DEPTH} levels deep; not a recipe")
        return count, height


def load_recipe(path: Path, overrides: list[str] = ()) -> Recipe:
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise UserError(f"recipe not found: {path} (give the path of a .yaml recipe, e.g. recipes/smollm2_3bit.yaml)")
    except IsADirectoryError:
        raise UserError(f"{path} is a folder; give the path of a .yaml recipe")
    except OSError as e:
        raise UserError(f"cannot read recipe {path}: {e.strerror}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}); save the recipe as UTF-8") from None
    data = parse_yaml(text, str(path))
    for item in overrides:
        apply_override(data, item)
    try:
        return parse_recipe(data)
    except ValueError as e:
        raise UserError(f"{path}: {e}")


def apply_override(data: Any, item: str) -> None:
    """`--set a.b=value`: value parsed as YAML; `stages.NAME.key` addresses the only stage of that name."""
    if "=" not in item:
        raise UserError(f"--set {item}: expected key.path=value")
    key, raw = item.split("=", 1)
    value = parse_yaml(raw, f"--set {key}")
    parts = key.split(".")
    if not isinstance(data, dict):
        raise UserError("--set needs a recipe that is a YAML mapping")
    node = data
    for i, part in enumerate(parts[:-1]):
        node = _child(node, part, ".".join(parts[: i + 1]))
    if isinstance(node, list):
        node[_index(node, parts[-1], key)] = value
    elif isinstance(node, dict):
        node[parts[-1]] = value
    else:
        raise UserError(f"--set {key}: '{'.'.join(parts[:-1])}' is not a mapping")


def _child(node: Any, part: str, where: str) -> Any:
    if isinstance(node, list):
        i = _index(node, part, where)
        item = node[i]
        if isinstance(item, str):  # bare `- evaluate` becomes a mapping we can set keys in
            item = node[i] = {item: {}}
        if isinstance(item, dict) and len(item) == 1:
            ((name, body),) = item.items()
            if body is None:
                body = item[name] = {}
            return body
        return item
    if isinstance(node, dict):
        return node.setdefault(part, {})
    raise UserError(f"--set: '{where}' is not a mapping or list")


def _index(stages: list, part: str, where: str) -> int:
    if part.isdigit() and int(part) < len(stages):
        return int(part)
    hits = [i for i, s in enumerate(stages) if stage_name(s) == part]
    if len(hits) != 1:
        why = "no stage" if not hits else f"{len(hits)} stages"
        raise UserError(f"--set {where}: {why} named '{part}'; use the stage's position (stages.N.key)")
    return hits[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gift_quant.recipe", description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="override a recipe value, e.g. --set stages.quantize.bits=2")
    parser.add_argument("--output-dir", type=Path, help="where results, logs and checkpoints go")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate and print the plan and each stage's estimated peak memory and time; load nothing")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    previous = _on_signals()
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        if args.output_dir is not None and str(args.output_dir).strip() in ("", "."):
            raise UserError("--output-dir must name a folder of its own (not empty, not the working directory)")
        output_dir = (args.output_dir or recipe.output_dir or Path("outputs") / args.recipe.stem).expanduser()
        from .estimate import check_bounds
        from .pipeline import plan, run

        print(plan(recipe, output_dir))
        if args.dry_run:
            from .estimate import report

            print(report(recipe))
            check_bounds(recipe)  # a run checks with the loaded model's config, after the more specific checks
            return 0
        state = run(recipe, output_dir)
        print((output_dir / "report.md").read_text())
        print(f"results: {output_dir / 'results.json'}")
        del state
        return 0
    except KeyboardInterrupt as e:
        if args.debug:
            raise
        name = getattr(e, "name", "SIGINT")
        print(f"error: interrupted by {name}; a rerun of the same command resumes", file=sys.stderr)
        return 128 + getattr(e, "signum", signal.SIGINT)
    except Exception as e:  # noqa: BLE001 (user_message decides: one line for what a user can act on)
        message = user_message(e)
        if args.debug or message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
    finally:
        _restore_signals(previous)


def _on_signals() -> dict:
    """SIGTERM (what schedulers send) and SIGINT stop the run through an exception, so that every ``finally`` runs
    and the run is recorded as interrupted; returns the handlers to restore."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def stop(signum, frame):
        raise Interrupted(signum, signal.Signals(signum).name)

    return {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}


def _restore_signals(previous: dict) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


# Messages of the libraries' writers when the disk is full or a file-size limit is hit (they are not OSError).
_WRITE_FAILURES = ("inline_container.cc", "PytorchStreamWriter", "No space left", "File too large",
                   "Disk quota exceeded")


def user_message(err: BaseException) -> str | None:
    """One line for an error the user can act on, or None for a bug (whose traceback is then shown)."""
    if isinstance(err, UserError):
        return " ".join(str(err).split())
    if isinstance(err, MemoryError) or "out of memory" in str(err).lower() or "allocate memory" in str(err):
        return "out of memory: lower batch_size, num_samples, seq_len or max_windows (--debug shows where)"
    if isinstance(err, OSError):  # a full disk, a permission, a file removed while the run used it
        return f"{err.strerror or err}{f': {err.filename}' if err.filename else ''}"
    if type(err).__name__ == "SafetensorError" or any(m in str(err) for m in _WRITE_FAILURES):
        return (f"cannot write a file (disk full or file-size limit?): {' '.join(str(err).split())[:300]}; free "
                f"space and rerun, finished stages resume")
    return None


if __name__ == "__main__":
    sys.exit(main())
