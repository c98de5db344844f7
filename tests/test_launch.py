"""The launcher's command line: its own options, then the script or module with untouched args."""

import pytest

from ulysses_attn.launch import _split, main


@pytest.mark.parametrize(
    "argv, own, target",
    [
        (["--sp-size", "2", "-m", "pkg.train", "--lr", "1e-5"], ["--sp-size", "2"], ["-m", "pkg.train", "--lr", "1e-5"]),
        (["--sp-size=2", "--kernel", "sdpa", "train.py", "--sp-size", "8"], ["--sp-size=2", "--kernel", "sdpa"],
         ["train.py", "--sp-size", "8"]),
        (["train.py"], [], ["train.py"]),
        (["--sp-size", "2"], ["--sp-size", "2"], []),
    ],
)
def test_split(argv, own, target):
    assert _split(argv) == (own, target)


def test_missing_script_is_an_error(capsys):
    with pytest.raises(SystemExit):
        main(["--sp-size", "1"])
    assert "give a script" in capsys.readouterr().err


@pytest.mark.parametrize("code", [0, 3])
def test_script_exit_code_is_kept(tmp_path, code):
    # sys.exit(0) ends the script, not the launcher (which still tears the process groups down);
    # any other code is the launcher's exit code
    import subprocess
    import sys

    script = tmp_path / "script.py"
    script.write_text(f"import sys\nprint('ran')\nsys.exit({code})\n")
    proc = subprocess.run([sys.executable, "-m", "ulysses_attn.launch", "--sp-size", "1", str(script)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == code and "ran" in proc.stdout, proc.stderr[-2000:]
