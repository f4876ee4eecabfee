"""`zoo list / info / flops` (the CLI skeleton)."""
import os
import shutil
import subprocess
import sys

import toy_models  # noqa: F401

from zoo.cli import main


def test_list_info_flops(capsys):
    assert main(["list", "zootest_*"]) == 0
    assert capsys.readouterr().out.split() == ["zootest_toygen", "zootest_toynet"]
    assert main(["info", "zootest_toynet"]) == 0
    out = capsys.readouterr().out
    assert "params:" in out and "FLOPs:" in out and "pretrained: none registered" in out
    assert main(["flops", "zootest_toynet", "--input-size", "3", "64", "64"]) == 0
    assert "FLOPs" in capsys.readouterr().out


def test_unknown_model_is_one_line_with_suggestion(capsys):
    assert main(["info", "zootest_toynett"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "did you mean zootest_toynet" in err


def test_console_script_help():
    script = shutil.which("zoo", path=os.path.dirname(sys.executable))
    for command in ([script] if script else []) + [[sys.executable, "-m", "zoo"]]:
        command = command if isinstance(command, list) else [command]
        out = subprocess.run(command + ["--help"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "info" in out.stdout
