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
