"""A user's mistake on the command line is one ``error:`` line on stderr and exit code 2, with no
traceback unless ``--verbose`` or ``FTJAX_DEBUG=1``; a bug keeps its traceback (exit code 1).

Every run fails before anything is compiled: most while the flags are parsed, the rest while the
experiment is built.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _train(*args: str, debug: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "FTJAX_DEBUG"}
    if debug:
        env["FTJAX_DEBUG"] = "1"
    return subprocess.run([sys.executable, "scripts/train.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def _error_line(proc: subprocess.CompletedProcess) -> str:
    """The one ``error:`` line, after checking the exit code and that no traceback was printed."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, proc.stderr
    assert proc.stderr.rstrip().endswith(lines[0])  # the last thing printed
    return lines[0]


def _config_file(tmp_path: Path, body: str) -> str:
    path = tmp_path / "cfg.py"
    path.write_text(textwrap.dedent(body))
    return str(path)


# A locked config that imports only ml_collections: these runs take a fraction of a second.
_SMALL = """\
    import ml_collections


    def get_config(arg=None):
        c = ml_collections.ConfigDict({"train": {"steps": 1, "seed": 0}})
        c.lock()
        return c
    """


def test_typo_in_override_is_one_line_naming_key_and_fix(tmp_path):
    proc = _train("--config=tiny", f"--workdir={tmp_path}", "--config.train.stpes=5")
    assert _error_line(proc) == 'error: config key train.stpes does not exist. Did you mean "train.steps"?'


def test_typo_in_override_section(tmp_path):
    proc = _train(f"--config={_config_file(tmp_path, _SMALL)}", f"--workdir={tmp_path}",
                  "--config.trian.steps=5")
    assert _error_line(proc) == 'error: config key trian.steps does not exist. Did you mean "train.steps"?'


@pytest.mark.parametrize("how", ["env", "flag"])
def test_debug_shows_the_traceback_and_the_same_line(tmp_path, how):
    args = [f"--config={_config_file(tmp_path, _SMALL)}", f"--workdir={tmp_path}", "--config.train.stpes=5"]
    proc = _train(*args, "--verbose") if how == "flag" else _train(*args, debug=True)
    assert proc.returncode == 2
    assert "Traceback (most recent call last)" in proc.stderr and "ml_collections" in proc.stderr
    assert proc.stderr.rstrip().splitlines()[-1] == (
        'error: config key train.stpes does not exist. Did you mean "train.steps"?')


def test_typo_in_config_argument(tmp_path):
    proc = _train("--config=tiny:stpes=5", f"--workdir={tmp_path}")
    assert _error_line(proc) == ("error: config argument 'stpes' (from ':stpes=5') is not one of "
                                 "['remat', 'scan', 'steps']. Did you mean \"steps\"?")


def test_typo_inside_config_file_names_file_and_line(tmp_path):
    path = _config_file(tmp_path, _SMALL.replace("        c.lock()\n", "        c.lock()\n        c.train.stpes = 5\n"))
    proc = _train(f"--config={path}", f"--workdir={tmp_path}")
    assert _error_line(proc) == (f"error: {path}:7: config key 'stpes' does not exist "
                                 f"(`c.train.stpes = 5`). Did you mean \"steps\"?")


def test_missing_config_file_and_unknown_config_name(tmp_path):
    missing = tmp_path / "nope.py"
    proc = _train(f"--config={missing}:x=1", f"--workdir={tmp_path}")
    assert _error_line(proc).startswith(f"error: config file {missing} not found")
    proc = _train("--config=tiyn", f"--workdir={tmp_path}")
    line = _error_line(proc)
    assert line.startswith("error: --config=tiyn: no such file, and no config named 'tiyn'")
    assert line.endswith('Did you mean "tiny"?')


def test_bad_flag_value_and_unknown_flag(tmp_path):
    config = f"--config={_config_file(tmp_path, _SMALL)}"
    proc = _train(config, f"--workdir={tmp_path}", "--config.train.steps=many")
    assert _error_line(proc) == ("error: flag --config.train.steps=many: invalid literal for int() "
                                 "with base 10: 'many'")
    proc = _train(config, f"--workdri={tmp_path}")
    assert "Unknown command line flag 'workdri'" in _error_line(proc)


def test_bad_mesh(tmp_path):
    proc = _train("--config=tiny", f"--workdir={tmp_path}", "--config.mesh.data=3")
    line = _error_line(proc)
    assert line.startswith("error: config.mesh:") and "3" in line and "8 devices" in line


def test_empty_train_file_names_the_file(tmp_path):
    empty = tmp_path / "train.txt"
    empty.write_text("")
    proc = _train("--config=tiny", f"--workdir={tmp_path / 'w'}", f"--config.data.train_path={empty}")
    assert _error_line(proc) == (f"error: {empty}: the train split has no rows (is the file empty?); "
                                 f"check config.data.train_path")


def test_a_bug_keeps_its_traceback(tmp_path):
    path = _config_file(tmp_path, """\
        def get_config(arg=None):
            raise RuntimeError("a bug, not a user error")
        """)
    proc = _train(f"--config={path}", f"--workdir={tmp_path}")
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stderr
    assert proc.stderr.rstrip().endswith("RuntimeError: a bug, not a user error")
    assert not any(line.startswith("error: ") for line in proc.stderr.splitlines())


def test_config_argument_with_a_bad_value():
    from ftjax.config import ConfigArgError, parse_arg

    with pytest.raises(ConfigArgError) as e:
        parse_arg("steps=many", steps=60)
    assert str(e.value) == "config argument steps='many' is not a valid int"


def test_missing_workdir_file_names_the_path(tmp_path):
    workdir = tmp_path / "no_run"
    proc = subprocess.run([sys.executable, "scripts/export.py", f"--workdir={workdir}", f"--out={tmp_path / 'o'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert str(workdir / "config.json") in _error_line(proc)
