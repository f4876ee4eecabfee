"""Run a test module's kernel cases under Triton's interpreter (TRITON_INTERPRET=1 is read at import)."""
import json
import os
import subprocess
import sys


def run_interpreter(test_file: str, cases: list) -> list:
    """`python test_file '<cases as JSON>'` with the interpreter on; the module prints its results as JSON."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, test_file, json.dumps(cases)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
