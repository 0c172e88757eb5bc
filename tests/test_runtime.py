"""common.runtime: flags answer to both spellings (``_`` and ``-``) in every experiment CLI."""
import argparse

import pytest

from common.runtime import add_common_args
from label_noise_mwn import train as mwn_train
from rotation import train as rotation_train


def test_both_spellings_name_the_same_flag():
    parser = argparse.ArgumentParser()
    parser.add_argument("--inner_steps", type=int, default=1)
    add_common_args(parser)
    args = parser.parse_args(["--inner-steps", "3", "--data_root", "x", "--seeds", "4", "5"])
    assert (args.inner_steps, args.data_root, args.seeds) == (3, "x", [4, 5])
    assert parser.parse_args(["--inner_steps=7", "--data-root=y"]).inner_steps == 7
    with pytest.raises(SystemExit):                     # an unknown flag is still an error
        parser.parse_args(["--no-such-flag"])


def test_experiments_accept_each_others_spellings():
    rot = rotation_train.build_parser().parse_args(["--methods", "evograd", "--n_candidates", "5",
                                                    "--inner_steps", "2", "--fd-epsilon", "0.1"])
    assert (rot.method, rot.k, rot.inner_steps, rot.fd_epsilon) == (["evograd"], 5, 2, 0.1)
    mwn = mwn_train.build_parser().parse_args(["--n-candidates", "3", "--inner-steps", "2", "--corruption-prob", "0.6"])
    assert (mwn.n_candidates, mwn.inner_steps, mwn.corruption_prob) == (3, 2, 0.6)


def test_a_torchrun_rank_that_lost_its_peer_says_so_in_one_line(monkeypatch, capsys):
    """The error gloo raises in the surviving rank's collective when another rank is killed (as printed by
    torch 2.x): one line and status 1, not its traceback; outside torchrun the same error is not guessed at."""
    from common.runtime import run_cli

    def main(argv):
        raise RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:3459: "
                           "Connection reset by peer. This is typically caused by a remote worker hanging or bugs "
                           "in the application. Check the logs of the remote worker before reporting an error.")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit) as done:
        run_cli(main, [])
    err = capsys.readouterr().err
    assert done.value.code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "process 1 of this torchrun job stopped" in err and "Connection reset by peer" in err and "--resume" in err
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(RuntimeError, match="Connection reset by peer"):
        run_cli(main, [])
