"""Run several command lines of mnist_lab's commands in this one process, each through the command's own
``main()`` with its own ``sys.argv`` and environment; what each printed and its exit code are written as
JSON. A fresh interpreter per case (``python -m``) spends seconds importing torch and Lightning: most of
what a table of one-line error cases costs.

Usage: ``python cli_cases.py CASES.json RESULTS.json`` with ``[{"module", "args", "env"}, ...]``.
"""

import contextlib
import importlib
import io
import json
import os
import sys
import traceback


def run(case: dict) -> dict:
    os.environ.update(case.get("env", {}))
    sys.argv = [case["module"], *case["args"]]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            importlib.import_module(case["module"]).main()
            code = 0
        except SystemExit as e:  # what the command line sees: the exit code
            code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        except BaseException:  # an uncaught error: Python would print the traceback and exit with 1
            traceback.print_exc(file=err)
            code = 1
    return {"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()}


if __name__ == "__main__":
    spec, out = sys.argv[1:3]  # before the cases set sys.argv
    with open(spec) as f:
        cases = json.load(f)
    results = [run(case) for case in cases]
    with open(out, "w") as f:
        json.dump(results, f)
