"""The command line is built from option dataclasses: help everywhere, the dataclasses' defaults, the old spellings."""

from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import MISSING, dataclass, fields, replace

import pytest

from saeray.cli import COMMANDS, build_parser
from saeray.cli.analyses import DiffArgs, ExploreArgs, SeparateArgs, StatsArgs, TopArgs, TransferArgs
from saeray.cli.options import Command, LazyParser, add_command, add_options, option, options_from
from saeray.cli.reports import ExportArgs, ReportArgs
from saeray.cli.running import CorpusArgs, DemoArgs, RunArgs
from saeray.cli.tools import ConceptArgs, LogitsArgs, ProbeArgs, SynthArgs, TrainSaeArgs
from saeray.tools.synth import SynthOptions
from saeray.tools.train import TrainOptions


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, LazyParser]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {name: p.ready() for name, p in sub.choices.items()}


def _parse(line: str) -> list[object]:
    """The option objects the command of `line` runs with."""
    ns = build_parser().parse_args(line.split())
    return [options_from(cls, ns) for cls in COMMANDS[ns.command].option_classes()]


def test_every_command_is_registered_in_order():
    assert list(_subparsers(build_parser())) == list(COMMANDS)
    assert set(COMMANDS) == set(LINES), set(COMMANDS) ^ set(LINES)


def test_every_option_of_every_command_has_help():
    parser = build_parser()
    missing = [f"saeray {name} {a.dest}" for name, p in [("", parser), *_subparsers(parser).items()]
               for a in p._actions
               if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))
               and (not a.help or a.help == argparse.SUPPRESS)]
    assert not missing


def test_every_option_class_field_is_declared_with_help():
    for cmd in COMMANDS.values():
        for cls in cmd.option_classes():
            for f in fields(cls):
                assert f.metadata.get("help"), f"{cls.__name__}.{f.name} of saeray {cmd.name} has no help"


def test_parser_defaults_are_the_dataclass_defaults():
    subs = _subparsers(build_parser())
    checked = 0
    for name, cmd in COMMANDS.items():
        actions = {a.dest: a for a in subs[name]._actions}
        for cls in cmd.option_classes():
            for f in fields(cls):
                if not f.metadata["cli"].get("cli", True):
                    assert f.name not in actions
                    continue
                action = actions[f.name]
                if f.default is MISSING and f.default_factory is MISSING:
                    assert action.required or not action.option_strings, (name, f.name)
                    continue
                want = f.default if f.default is not MISSING else f.default_factory()
                assert action.default == want and not action.required, (name, f.name, action.default, want)
                checked += 1
    assert checked > 100


def test_train_sae_and_synth_take_their_defaults_from_the_tool_options():
    train_args, train = _parse("train-sae c.yaml --hook blocks.6.hook_resid_post --out D")
    assert train_args == TrainSaeArgs(config="c.yaml", out="D")
    assert train == TrainOptions(hook="blocks.6.hook_resid_post")
    assert _parse("synth R -f 0-19 --out D")[1] == SynthOptions()


def test_a_changed_default_changes_the_parser():
    @dataclass(frozen=True)
    class Wider(TrainOptions):
        d_sae: int = option(8192, "latents")

    parser = argparse.ArgumentParser()
    add_options(parser, Wider)
    assert options_from(Wider, parser.parse_args(["--hook", "h"])) == Wider(hook="h")
    assert parser.parse_args(["--hook", "h"]).d_sae == 8192 != TrainOptions(hook="h").d_sae
    assert parser.parse_args(["--hook", "h", "--d-sae", "3"]).d_sae == 3


LINES = {
    "run": ("-v run c.yaml --out R --set a.b=1 --set c=2 --workers 3 --overwrite --local",
            [RunArgs(config="c.yaml", out="R", set=["a.b=1", "c=2"], workers=3, overwrite=True, local=True)]),
    "stats": ("stats R", [StatsArgs(run="R")]),
    "train-sae": ("train-sae c.yaml --hook h --out D --set x=1 --arch jumprelu --d-sae 128 --k 8 --l0-coefficient 2 "
                  "--train-tokens 5 --epochs 1.5 --batch-size 64 --lr 0.01 --eval-tokens 7 --held-out-fraction 0.25 "
                  "--dead-window 3 --aux-coefficient 0.5 --normalize none --activation-cache C "
                  "--max-norm-ratio 10 --seed 4",
                  [TrainSaeArgs(config="c.yaml", out="D", set=["x=1"]),
                   TrainOptions(hook="h", arch="jumprelu", d_sae=128, k=8, l0_coefficient=2.0, train_tokens=5,
                                epochs=1.5, batch_size=64, lr=0.01, eval_tokens=7, held_out_fraction=0.25,
                                dead_window=3, aux_coefficient=0.5, normalize="none", activation_cache="C",
                                max_norm_ratio=10.0, seed=4)]),
    "top": ("top R -f 1 --feature 2-3 --k 3 --sae s --group g --before 2 --after 3 --intervals 5 --per-bin 2 "
            "--seed 1 --source rows --no-decode --out t.parquet",
            [TopArgs(run="R", feature=["1", "2-3"], k=3, sae="s", group="g", before=2, after=3, intervals=5,
                     per_bin=2, seed=1, source="rows", no_decode=True, out="t.parquet")]),
    "probe": ("probe R -f 1 --feature 2 --text a --text b --file F --sae s --counted-only --csv o.csv",
              [ProbeArgs(run="R", feature=["1", "2"], text=["a", "b"], file="F", sae="s", counted_only=True,
                         csv="o.csv")]),
    "concept": ("concept R --example a --example b --counter c --reference P --sae s --k 5 --csv o.csv",
                [ConceptArgs(run="R", example=["a", "b"], counter=["c"], reference="P", sae="s", k=5, csv="o.csv")]),
    "export": ("export delphi R --out D --sae s --group g --features-per-batch 4 --features 0-9 --top-examples 3 "
               "--intervals 2 --per-interval 1 --context 4 --gzip --splits 2",
               [ExportArgs(format="delphi", run="R", out="D", sae="s", group="g", features_per_batch=4,
                           features="0-9", top_examples=3, intervals=2, per_interval=1, context=4, gzip=True,
                           splits=2)]),
    "logits": ("logits R -f 1,2 --k 3 --sae s --csv o.csv --save",
               [LogitsArgs(run="R", feature=["1,2"], k=3, sae="s", csv="o.csv", save=True)]),
    "explore": ("explore R --category kind --features 0-20 --n 4 --strong-frac 0.3 --sae s --group g --out D",
                [ExploreArgs(run="R", category="kind", features="0-20", n=4, strong_frac=0.3, sae="s", group="g",
                             out="D")]),
    "synth": ("synth R -f 1 --features 2 --out D --reference P --sae s --group g --seq-len 4 --steps 5 --lr 0.2 "
              "--norm-quantile 0.9 --batch-features 2 --seed 3",
              [SynthArgs(run="R", features=["1", "2"], out="D", reference="P", sae="s", group="g"),
               SynthOptions(seq_len=4, steps=5, lr=0.2, norm_quantile=0.9, batch_features=2, seed=3)]),
    "diff": ("diff A B --out D --preset vlm_transfer --pseudo 2 --active-value 0.1 --active-fraction 0.2 "
             "--new-ratio 3 --stable-rho 0.7 --shifted-rho 0.3 --top-k 5 --no-significance --source partials",
             [DiffArgs(run_a="A", run_b="B", out="D", preset="vlm_transfer", pseudo=2.0, active_value=0.1,
                       active_fraction=0.2, new_ratio=3.0, stable_rho=0.7, shifted_rho=0.3, top_k=5,
                       no_significance=True, source="partials")]),
    "transfer": ("transfer A B C --out D --active-value 0.1 --active-fraction 0.2 --new-ratio 3 --stable-rho 0.7 "
                 "--shifted-rho 0.3",
                 [TransferArgs(base="A", vlm_text="B", vlm_image="C", out="D", active_value=0.1,
                               active_fraction=0.2, new_ratio=3.0, stable_rho=0.7, shifted_rho=0.3)]),
    "separate": ("separate R --label c --positive yes --reference P --max-density 0.1 --reference-group g "
                 "--train-fraction 0.6 --seed 2 --select-by f_diff --top-k 3 --source rows --out D",
                 [SeparateArgs(run="R", label="c", positive="yes", reference="P", max_density=0.1,
                               reference_group="g", train_fraction=0.6, seed=2, select_by="f_diff", top_k=3,
                               source="rows", out="D")]),
    "report": ("report R --vs B --separation S --category kind --features 0-10,50-60 --top 3 --k 2 --before 4 "
               "--after 5 --sae s --group g --preset vlm_transfer --logits --out D",
               [ReportArgs(run="R", vs="B", separation="S", category="kind", features="0-10,50-60", top=3, k=2,
                           before=4, after=5, sae="s", group="g", preset="vlm_transfer", logits=True, out="D")]),
    "corpus": ("corpus --out D --files 2 --chat smollm2-135m-instruct --prompts 10",
               [CorpusArgs(out="D", files=2, chat="smollm2-135m-instruct", prompts=10)]),
    "demo": ("demo --out D --workers 2 --tiny --stats-only", [DemoArgs(out="D", workers=2, tiny=True, stats_only=True)]),
}
"""A command line per command, every option given (the spellings README.md documents), and what it parses to."""


@pytest.mark.parametrize("name", list(LINES))
def test_a_full_command_line_parses_to_its_options(name):
    line, want = LINES[name]
    assert _parse(line) == want
    # Every value differs from its default, so an option bound to the wrong field cannot pass.
    same = [f"{type(obj).__name__}.{f.name}" for obj in want for f in fields(obj)
            if f.metadata["cli"].get("cli", True) and f.default is not MISSING and getattr(obj, f.name) == f.default]
    assert not same


@pytest.mark.parametrize("line, want", [
    ("run c.yaml", [RunArgs(config="c.yaml")]),
    ("top R --feature 0-10,42", [TopArgs(run="R", feature=["0-10,42"])]),
    ("diff A B --out D", [DiffArgs(run_a="A", run_b="B", out="D")]),
    ("export neuronpedia R --out D", [ExportArgs(format="neuronpedia", run="R", out="D")]),
    ("corpus", [CorpusArgs()]),
    ("demo", [DemoArgs()]),
])
def test_a_short_command_line_leaves_the_defaults(line, want):
    assert _parse(line) == want


@pytest.mark.parametrize("line, message", [
    ("top R", "the following arguments are required: --feature/-f"),
    ("synth R --out D", "the following arguments are required: --features/-f"),
    ("train-sae c.yaml --out D", "the following arguments are required: --hook"),
    ("export csv R --out D", "invalid choice: 'csv'"),
    ("diff A B --out D --preset x", "invalid choice: 'x'"),
    ("top R -f 1 --k many", "argument --k: invalid int value: 'many'"),
])
def test_bad_command_lines_exit_2_with_argparse_messages(line, message, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(line.split())
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_help_text_shows_the_defaults_help_and_flags(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train-sae", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # as one line, however argparse wraps it
    for text in ("--d-sae D_SAE", "latents (the SAE's width)", "--activation-cache DIR", "--max-norm-ratio R",
                 "{expected_average_only_in,covariance_whitening,none}", "--set KEY=VALUE"):
        assert text in out
    assert "--label-column" not in out  # TrainOptions.label_column is declared cli=False
    with pytest.raises(SystemExit):
        build_parser().parse_args(["diff", "--help"])
    assert "value > 0.1 on > 1% of tokens" in " ".join(capsys.readouterr().out.split())


def test_saeray_help_imports_no_command_options():
    code = ("import sys\nfrom saeray.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'saeray.tools.train', 'saeray.tools.synth', 'polars') if m in sys.modules]\n"
            "print(heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_declaration_mistakes_are_refused():
    with pytest.raises(TypeError, match="needs help"):
        option(1)

    @dataclass
    class Odd:
        pair: tuple[int, int] = option((1, 2), "two ints")

    with pytest.raises(TypeError, match="cannot parse"):
        add_options(argparse.ArgumentParser(), Odd)

    @dataclass
    class On:
        fast: bool = option(True, "a switch that is on")

    with pytest.raises(TypeError, match="must default to False"):
        add_options(argparse.ArgumentParser(), On)

    @dataclass
    class A:
        seed: int = option(0, "one seed")

    @dataclass
    class B:
        seed: int = option(1, "another seed")

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", parser_class=LazyParser)
    add_command(sub, Command("twice", "clashing options", (A, B), lambda a, b: 0))
    with pytest.raises(TypeError, match="also in A"):
        parser.parse_args(["twice"])


def test_option_lists_are_fresh_per_instance():
    a, b = RunArgs(config="x"), RunArgs(config="y")
    assert a.set == [] and a.set is not b.set
    assert replace(a, set=["k=v"]).set == ["k=v"] and a.set == []


def test_options_that_need_a_missing_module_give_one_line(monkeypatch, capsys):
    from saeray import cli

    def torch_missing() -> type:
        raise ModuleNotFoundError("No module named 'torch'", name="torch")

    monkeypatch.setitem(cli.COMMANDS, "train-sae", replace(cli.COMMANDS["train-sae"],
                                                            options=(TrainSaeArgs, torch_missing)))
    assert cli.main(["train-sae", "c.yaml", "--hook", "h", "--out", "D"]) == 2
    assert capsys.readouterr().err.strip() == ("error: saeray train-sae needs the Python module 'torch', "
                                               "which is not installed")
