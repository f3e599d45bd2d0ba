"""LCSM_LOGS: switch on the package's loggers from the environment, tinygrad-style one knob.

    LCSM_LOGS=detect,passes          the loggers lcsm_compile.detect and lcsm_compile.passes, INFO
    LCSM_LOGS=all                    every area
    LCSM_LOGS=all+debug              every area at DEBUG
    LCSM_LOGS=detect+debug,passes    detect at DEBUG, passes at INFO

Areas: detect, passes, schedule, kernels, backend, runtime. Enabled loggers write one line per record to
stderr (`[lcsm detect] ...`) and do not propagate, so a root logging set-up cannot print them
twice. Modules log through `get_logger(area)`; with LCSM_LOGS unset nothing is printed and a
disabled call costs one level check. `configure_from_env()` runs on `import lcsm_compile`: it only
reads the variable and touches the `logging` module (no torch, no triton).
"""

import logging
import os
import sys

AREAS = ("detect", "passes", "schedule", "kernels", "backend", "runtime")
ENV = "LCSM_LOGS"
ROOT = "lcsm_compile"


class _StderrHandler(logging.StreamHandler):
    """Writes to the current sys.stderr (looked up per record, so redirections and pytest's capture
    see the lines)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # logging.StreamHandler.__init__ assigns it; the property ignores it
        pass


_handler = None
_configured: dict[str, int] = {}


def get_logger(area: str) -> logging.Logger:
    """The logger of one area (`lcsm_compile.<area>`); areas outside AREAS are allowed (sub-areas)."""
    return logging.getLogger(f"{ROOT}.{area}")


def parse(spec: str) -> tuple[dict[str, int], list[str]]:
    """LCSM_LOGS text -> ({area: level}, [unknown items]). '+debug' on an item sets DEBUG for that
    item; a bare 'debug' / '+debug' item sets DEBUG for every item listed."""
    levels, unknown, all_debug = {}, [], False
    for raw in (spec or "").replace(";", ",").split(","):
        item = raw.strip().lower()
        if not item:
            continue
        debug = item.endswith("+debug")
        name = item[: -len("+debug")] if debug else item
        if name in ("", "debug"):
            all_debug = True
            continue
        names = AREAS if name == "all" else (name,) if name in AREAS else ()
        if not names:
            unknown.append(raw.strip())
        for n in names:
            levels[n] = min(levels.get(n, logging.INFO), logging.DEBUG if debug else logging.INFO)
    if all_debug:
        levels = {n: logging.DEBUG for n in levels} or {n: logging.DEBUG for n in AREAS}
    return levels, unknown


def configure(spec: str | None) -> dict[str, int]:
    """Enable the areas named in `spec` (LCSM_LOGS syntax), disable the ones enabled before.
    Returns {area: level} now enabled."""
    global _handler
    if _handler is None:
        _handler = _StderrHandler()
        _handler.setFormatter(logging.Formatter("[lcsm %(area)s] %(message)s"))
        _handler.addFilter(_add_area)
    for area in list(_configured):  # undo a previous configuration
        logger = get_logger(area)
        logger.removeHandler(_handler)
        logger.setLevel(logging.NOTSET)
        logger.propagate = True
        del _configured[area]
    levels, unknown = parse(spec or "")
    for area, level in levels.items():
        logger = get_logger(area)
        logger.setLevel(level)
        logger.addHandler(_handler)
        logger.propagate = False
        _configured[area] = level
    if unknown:
        print(f"lcsm_compile: {ENV}: ignoring unknown area(s) {', '.join(unknown)} "
              f"(known: {', '.join(AREAS)}, all, +debug)", file=sys.stderr)
    return dict(_configured)


def configure_from_env() -> dict[str, int]:
    """Apply $LCSM_LOGS (no-op when it is unset and nothing was configured before)."""
    spec = os.environ.get(ENV, "")
    if not spec and not _configured:
        return {}
    return configure(spec)


def enabled(area: str, level: int = logging.INFO) -> bool:
    return get_logger(area).isEnabledFor(level)


def _add_area(record):
    name = record.name
    record.area = name[len(ROOT) + 1:] if name.startswith(ROOT + ".") else name
    if record.levelno != logging.INFO:
        record.area = f"{record.area} {record.levelname.lower()}"
    return True
