"""Optional back-ends: torchao's import-time warnings are kept out of runs that do not use it."""

from __future__ import annotations

import logging

from prefix_rft.runtime.backends import TORCHAO_IMPORT_LOGGERS, quiet_unused_backends


def _levels():
    return [logging.getLogger(name).level for name in TORCHAO_IMPORT_LOGGERS]


def test_quiet_unless_a_torchao_optimizer_is_chosen():
    saved = _levels()
    try:
        for name in TORCHAO_IMPORT_LOGGERS:
            logging.getLogger(name).setLevel(logging.NOTSET)
        quiet_unused_backends("adamw8bit")  # the run uses torchao: its warnings stay
        assert _levels() == [logging.NOTSET] * len(TORCHAO_IMPORT_LOGGERS)
        quiet_unused_backends("adamw")
        assert _levels() == [logging.ERROR] * len(TORCHAO_IMPORT_LOGGERS)
    finally:
        for name, level in zip(TORCHAO_IMPORT_LOGGERS, saved):
            logging.getLogger(name).setLevel(level)
