"""The fork server that starts the integration tests' ranks (tests/support/forkserver.py): each
child is `python -m MODULE ARGS` with the environment, directory, output files and exit status
of a process of its own."""

import signal
import subprocess

import pytest

from tests.helpers import _forkserver

PROBE = """
import json, os, sys, time
print(json.dumps({"argv": sys.argv[1:], "cwd": os.getcwd(), "env": os.environ.get("PROBE"),
                  "path0": sys.path[0], "main": __name__}))
print("to stderr", file=sys.stderr)
mode = sys.argv[1]
if mode == "sleep":
    print("sleeping", flush=True)
    time.sleep(60)
if mode == "raise":
    raise ValueError("boom")
sys.exit(int(mode))
"""


@pytest.fixture
def probe(tmp_path):
    (tmp_path / "probe_mod.py").write_text(PROBE)
    return tmp_path


def start(probe, mode, env=None):
    env = {"PROBE": "yes", **(env or {})}
    log, out = probe / f"{mode}.log", probe / f"{mode}.out"
    return _forkserver().start("probe_mod", [mode], env, probe, log, out), log, out


def test_a_forked_child_runs_the_module_as_main_with_its_own_environment(probe):
    import json

    proc, log, out = start(probe, "3")
    assert proc.wait(timeout=60) == 3
    seen = json.loads(out.read_text())
    assert seen == {
        "argv": ["3"],
        "cwd": str(probe),
        "env": "yes",
        "path0": str(probe),
        "main": "__main__",
    }
    assert log.read_text() == "to stderr\n"  # stderr apart from stdout
    assert start(probe, "0")[0].wait(timeout=60) == 0


def test_an_exception_is_exit_1_with_its_traceback_and_a_signal_is_minus_its_number(probe):
    proc, log, _ = start(probe, "raise")
    assert proc.wait(timeout=60) == 1
    assert "ValueError: boom" in log.read_text()
    proc, _, out = start(probe, "sleep")
    with pytest.raises(subprocess.TimeoutExpired):  # still running: as Popen's wait
        proc.wait(timeout=0.5)
    while "sleeping" not in out.read_text():
        pass
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == -signal.SIGTERM
    assert proc.poll() == -signal.SIGTERM
    proc.kill()  # after the end: nothing to signal, no error


def test_the_server_has_not_imported_mmtrain_or_its_kernels(probe):
    (probe / "modules_mod.py").write_text(
        "import sys\nprint(sorted(m for m in ('mmtrain', 'kernels') if m in sys.modules))"
    )
    log, out = probe / "m.log", probe / "m.out"
    proc = _forkserver().start("modules_mod", [], {}, probe, log, out)
    assert proc.wait(timeout=60) == 0, log.read_text()
    assert out.read_text().strip() == "[]"
