"""Every CLI's --help shows each flag's default (common.runtime.DefaultsHelpFormatter)."""
import argparse
import importlib

import pytest

from common.runtime import DefaultsHelpFormatter

CLIS = ["common.bench", "common.gpu_bench", "common.hypergrad_study", "common.memory_model", "common.precision_study",
        "cross_domain_fewshot.train", "cross_domain_fewshot.eval", "cross_domain_fewshot.memory_fit",
        "illustration_1d.train", "illustration_1d.eval", "label_noise_mwn.train", "label_noise_mwn.eval",
        "metaxl.train", "metaxl.eval", "metaxl.candidate_study", "rotation.train", "rotation.eval"]


def shown_default(action: argparse.Action) -> str | None:
    """What the help must show for ``action``'s default (None: nothing to show)."""
    return DefaultsHelpFormatter._default_text(action)


def test_formatter_shows_defaults_lists_and_flags_without_help():
    parser = argparse.ArgumentParser(prog="x", formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--lr", type=float, default=3e-5, help="learning rate, 10%% warm-up")
    parser.add_argument("--methods", nargs="+", default=["a", "b"], help="methods")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu"])  # no help text
    parser.add_argument("--quick", action="store_true", help="small run")
    parser.add_argument("--data-root", default=None, help="folder; default: the embedded data")
    parser.add_argument("--checkpoint", required=True, help="a file")
    text = " ".join(parser.format_help().split())
    assert "learning rate, 10% warm-up (default: 3e-05)" in text
    assert "methods (default: a b)" in text
    assert "--device {auto,cpu} (default: auto)" in text
    assert "small run (default" not in text                      # a switch's False says nothing
    assert "default: the embedded data (default" not in text     # the help already says it
    assert "a file (default" not in text                         # required


@pytest.mark.parametrize("module", CLIS)
def test_every_cli_help_shows_each_default(module, monkeypatch, capsys):
    seen = []
    original = argparse.ArgumentParser.print_help

    def record(parser, file=None):
        seen.append(parser)
        original(parser, file)
    monkeypatch.setattr(argparse.ArgumentParser, "print_help", record)
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(module).main(["--help"])
    assert exit_info.value.code == 0
    (parser,) = seen
    assert parser.formatter_class is DefaultsHelpFormatter
    assert capsys.readouterr().out.startswith("usage:")
    with_default = [a for a in parser._actions if shown_default(a) is not None]
    assert with_default, f"{module}: no flag with a default"
    missing = [a.dest for a in with_default
               if "".join(f"(default: {shown_default(a)})".split())   # whitespace aside: the help wraps lines
               not in "".join(DefaultsHelpFormatter(parser.prog)._format_action(a).split())]
    assert not missing, f"{module} --help does not show the default of {missing}"
