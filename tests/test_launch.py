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
