"""A pytest plugin that writes each test's outcome to a JSON-lines file as it happens.

    NBK_TEST_LOG=out/tests.jsonl python -m pytest -p outcome_log tests/triton

One line per test phase that did not simply pass its setup or teardown: the node id, the
phase, the outcome, the duration and, for failures, the last lines of the report. Each
line is flushed at once, so a run killed by a time limit keeps every result up to then
(a junit file is written only at the end). Under pytest-xdist the controller writes.
"""
import json
import os
import time

_FILE = None


def pytest_configure(config):
    global _FILE
    path = os.environ.get("NBK_TEST_LOG")
    if path and not hasattr(config, "workerinput"):  # xdist workers report to the controller
        _FILE = open(path, "a", buffering=1)


def pytest_runtest_logreport(report):
    if _FILE is None or (report.when != "call" and report.passed):
        return
    line = dict(nodeid=report.nodeid, when=report.when, outcome=report.outcome,
                duration=round(report.duration, 3), time=round(time.time(), 1))
    if report.failed:
        line["error"] = str(report.longrepr).splitlines()[-20:]
    elif report.skipped and isinstance(report.longrepr, tuple):
        line["reason"] = report.longrepr[-1]
    _FILE.write(json.dumps(line) + "\n")


def pytest_unconfigure(config):
    global _FILE
    if _FILE is not None:
        _FILE.close()
        _FILE = None
