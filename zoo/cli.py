"""The ``zoo`` command. Core subcommands live here; ``train`` and ``serve`` add theirs as plugins.

Plugins register through the ``zoo.commands`` entry-point group (see pyproject.toml), so the
core package never imports ``train`` or ``serve``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from importlib.metadata import entry_points
from pathlib import Path

EPILOG_LIST = "example: zoo list 'simclr_*' --pretrained"
EPILOG_EVAL = (
    "example: zoo eval simclr_convnet_mnist5k --data mnist5k --protocol knn,linear,kmeans --json m.json\n"
    "         zoo eval runs/simclr_shapes/model --data shapes --protocol rlp --clusters 8\n"
    "         zoo eval simclr_convnet_mnist5k --protocol fewshot --ways 5 --shots 1,5 --episodes 600\n"
    "         zoo eval simclr_convnet_mnist5k --data mnist5k_lt100 --protocol longtail\n"
    "         zoo eval simclr_convnet_mnist5k --protocol lowlabel --fractions 0.01,0.1\n"
    "         zoo eval simclr_convnet_mnist5k --protocol lowlabel --lowlabel-mode finetune\n"
    "         zoo eval runs/simclr_shapes/model --data shapes --protocol bgswap\n"
    "         zoo eval clip_convnet_shapes --protocol zeroshot --data shapes --json zs.json\n"
    "         zoo eval clip_vitb32_openai --protocol zeroshot --data imagefolder --data-root imagenet/val\n"
    "         zoo eval runs/scan_mnist5k/model --protocol none --plots plots/ --run runs/scan_mnist5k"
)
EPILOG_LEADERBOARD = (
    "example: zoo leaderboard --data mnist5k\n"
    "         zoo leaderboard --data shapes --models 'runs/bench/shapes_e8/*/model' --protocols knn,linear,rlp\n"
    "         zoo leaderboard --data mnist5k --update-docs --docs docs/benchmarks.md"
)
EPILOG_INFO = "example: zoo info simclr_convnet_mnist5k"
EPILOG_PUBLISH = (
    "example: zoo publish runs/simclr/model --repo-id my-org/simclr-convnet-mnist5k\n"
    "         zoo publish runs/simclr/model --repo-id my-org/simclr-convnet-mnist5k --dry-run-to /tmp/upload\n"
    "The token comes from --token, $HF_TOKEN or the stored login (`hf auth login`)."
)
# Plugins found by module name when the package is used from a source tree without being installed.
FALLBACK_PLUGINS = ("train.cli", "serve.cli")


def load_model_arg(spec: str, pretrained: bool = True):
    """A MODEL argument (registered name, model folder, ``hf-hub:ORG/NAME``): :func:`zoo.resolve_model`."""
    from zoo.registry import resolve_model

    return resolve_model(spec, pretrained=pretrained)


def format_table(rows: list[dict], columns: list[str]) -> str:
    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.4f}"
        return "-" if value is None else str(value)

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def cmd_list(args: argparse.Namespace) -> int:
    import zoo

    rows = []
    for name in zoo.list_models(args.pattern, pretrained=args.pretrained):
        info = zoo.model_info(name)
        metrics = info.get("metrics") or {}
        rows.append(
            {
                "name": name,
                "arch": info["architecture"],
                "method": info.get("method"),
                "data": info.get("dataset"),
                "input": "x".join(map(str, info["input_size"][1:])),
                # shipped in the package, or an official checkpoint fetched and converted on first use
                "weights": {"package": "shipped", "url": "download"}.get(
                    (info.get("weights_source") or "").partition(":")[0], "-"
                ),
                "knn_top1": metrics.get("knn_top1"),
                "linear_top1": metrics.get("linear_top1"),
                "license": info.get("license"),
            }
        )
    print(format_table(rows, ["name", "arch", "method", "data", "input", "weights", "knn_top1", "linear_top1",
                              "license"]))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    import zoo

    if Path(args.model).is_dir():
        from zoo.checkpoint import read_config

        info = read_config(args.model)
    else:
        info = zoo.model_info(args.model)
    print(json.dumps(info, indent=2, sort_keys=True, default=str))
    return 0


def _shots(text: str) -> tuple[int, ...]:
    try:
        shots = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shots takes a comma list of integers, got {text!r}") from None
    if not shots or min(shots) < 1:
        raise argparse.ArgumentTypeError(f"--shots needs positive integers, got {text!r}")
    return shots


def _fractions(text: str) -> tuple[float, ...]:
    try:
        fractions = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--fractions takes a comma list of numbers, got {text!r}") from None
    if not fractions or not all(0 < f <= 1 for f in fractions):
        raise argparse.ArgumentTypeError(f"--fractions needs label fractions in (0, 1], got {text!r}")
    return fractions


def _protocol_list(text: str) -> tuple[str, ...]:
    # "cluster" is DESIGN.md's name for the k-means protocol; "none" runs no protocol (plots only)
    names = [{"cluster": "kmeans"}.get(p.strip(), p.strip()) for p in text.split(",") if p.strip()]
    return tuple(p for p in names if p != "none")


def cmd_eval(args: argparse.Namespace) -> int:
    from zoo.eval import evaluate

    protocols = _protocol_list(args.protocol)
    if not protocols and not args.plots:
        print("error: --protocol none leaves nothing to do; add --plots DIR", file=sys.stderr)
        return 2
    if args.run and not args.plots:
        print("error: --run draws training curves into the --plots folder; give --plots DIR", file=sys.stderr)
        return 2
    model = load_model_arg(args.model)
    data_kwargs = {"root": args.data_root} if args.data_root else {}
    data = args.data or model.pretrained_cfg.get("dataset")
    if not data:
        print("error: the model does not say which dataset it belongs to; pass --data", file=sys.stderr)
        return 2
    metrics: dict = {}
    if protocols:
        metrics = evaluate(model, data, protocols=protocols, batch_size=args.batch_size, device=args.device,
                           progress=not args.quiet, seed=args.seed, rlp_clusters=args.clusters,
                           fewshot_ways=args.ways, fewshot_shots=args.shots, fewshot_episodes=args.episodes,
                           lowlabel_fractions=args.fractions, lowlabel_mode=args.lowlabel_mode,
                           finetune_steps=args.finetune_steps, **data_kwargs)
        rows = [{"metric": k, "value": v} for k, v in metrics.items() if isinstance(v, float)
                and not k.startswith("rlp_")]
        if rows:
            print(format_table(rows, ["metric", "value"]))
        if "rlp" in protocols:
            from zoo.eval.rlp import rlp_table

            print(f"\nreverse linear probing, k = {int(metrics['rlp_k'])} clusters (held-out test split):")
            print(format_table(rlp_table(metrics), ["concepts", "nmi", "mi", "acc", "gain"]))
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(metrics, indent=2) + "\n")
        if args.write_metrics:
            write_metrics(args.model, metrics)
    if args.plots:
        from zoo.eval.plots import write_eval_plots

        run = args.run
        if run is None and Path(args.model).is_dir() and (Path(args.model).parent / "log.csv").is_file():
            run = str(Path(args.model).parent)  # a run's model folder: its training log sits next to it
        paths = write_eval_plots(model, data, args.plots, run_dir=run, embedding=args.embedding,
                                 k=args.clusters, batch_size=args.batch_size, device=args.device,
                                 progress=not args.quiet, seed=args.seed, **data_kwargs)
        for p in paths:
            print(f"wrote {p}")
    return 0


def cmd_leaderboard(args: argparse.Namespace) -> int:
    from zoo.eval.leaderboard import run_leaderboard, update_cards, update_docs

    protocols = _protocol_list(args.protocols) if args.protocols else None
    data_kwargs = {"root": args.data_root} if args.data_root else {}
    if args.update_docs and not Path(args.docs).is_file():
        print(f"error: --update-docs: {args.docs} does not exist (point --docs at the Markdown file)", file=sys.stderr)
        return 2
    board = run_leaderboard(args.data, protocols=protocols, models=args.models, out=args.out, sort=args.sort,
                            force=args.force, batch_size=args.batch_size, device=args.device,
                            progress=not args.quiet, seed=args.seed, rlp_clusters=args.clusters,
                            fewshot_ways=args.ways, fewshot_shots=args.shots, fewshot_episodes=args.episodes,
                            log=lambda msg: print(msg, file=sys.stderr), **data_kwargs)
    print(board["markdown"])
    for p in board["paths"]:
        print(f"wrote {p}")
    if args.update_docs:
        print(f"updated {update_docs(args.docs, args.data, board['markdown'])}")
    if args.update_cards:
        for folder in update_cards(board, log=print):
            print(f"updated {folder / 'config.json'} and its README.md")
    return 0


def write_metrics(folder: str, metrics: dict) -> None:
    """Store measured metrics in a model folder's config.json and regenerate its model card."""
    from zoo.checkpoint import CARD_NAME, CONFIG_NAME, atomic_write_text, read_config
    from zoo.hub import render_model_card

    if not Path(folder).is_dir():
        raise SystemExit(f"--write-metrics needs a local model folder, not {folder!r}")
    config = read_config(folder)
    config["metrics"] = metrics
    atomic_write_text(Path(folder) / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True) + "\n")
    atomic_write_text(Path(folder) / CARD_NAME, render_model_card(config))


def cmd_publish(args: argparse.Namespace) -> int:
    from zoo.hub import publish

    result = publish(args.folder, args.repo_id, token=args.token, private=args.private,
                     commit_message=args.message, target=args.dry_run_to)
    if args.dry_run_to:
        files = sorted(p.name for p in Path(result).iterdir() if p.is_file())
        print(f"dry run: wrote {', '.join(files)} to {result} (would be uploaded to {args.repo_id})")
    else:
        print(f"published {args.folder} to {result}")
    return 0


def _add_protocol_options(p: argparse.ArgumentParser) -> None:
    """Options shared by ``zoo eval`` and ``zoo leaderboard``: protocol settings and how to run them."""
    p.add_argument("--clusters", type=int, default=None,
                   help="rlp (and --plots k-means): number of k-means clusters (default: number of classes)")
    p.add_argument("--ways", type=int, default=None, help="fewshot: classes per episode (default: min(5, classes))")
    p.add_argument("--shots", type=_shots, default=(1, 5), help="fewshot: comma list of support sizes (default 1,5)")
    p.add_argument("--episodes", type=int, default=600, help="fewshot: episodes per setting (default 600)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zoo", description="selfsup-zoo: self-supervised encoders, from training to serving")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="list registered models", epilog=EPILOG_LIST)
    p.add_argument("pattern", nargs="?", help="shell-style filter, e.g. 'simclr_*'")
    p.add_argument("--pretrained", action="store_true", help="only models with weights")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("info", help="print a model's pretrained config", epilog=EPILOG_INFO)
    p.add_argument("model", help="registered name or model folder")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("eval", help="evaluate frozen features (kNN, linear probe, k-means, RLP, few-shot, ...)",
                       epilog=EPILOG_EVAL, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="registered name, model folder, or hf-hub:ORG/NAME")
    p.add_argument("--data", help="dataset name (default: the one the model was trained on)")
    p.add_argument("--data-root", help="dataset folder (imagefolder, cifar10, ...)")
    p.add_argument("--protocol", default="knn,linear,kmeans",
                   help="comma list of knn, linear, kmeans (alias: cluster), fewshot, rlp (needs a dataset with "
                        "concept labels: shapes), longtail (needs a *_lt dataset), lowlabel (1 %% / 10 %% labels), "
                        "bgswap (shapes: backgrounds swapped by exact masks), zeroshot (image-text models: prompted "
                        "class names, top-1/top-5), retrieval (text->image recall, shapes_captions); none: plots only")
    p.add_argument("--fractions", type=_fractions, default=None,
                   help="lowlabel: comma list of labelled fractions of the train split (default 0.01,0.1)")
    p.add_argument("--lowlabel-mode", default="linear", choices=("linear", "finetune", "both"),
                   help="lowlabel: linear probe + kNN on frozen features (default), fine-tune the encoder with a "
                        "linear head on the same subsets, or both")
    p.add_argument("--finetune-steps", type=int, default=None,
                   help="lowlabel fine-tune: optimiser steps per fraction (default 200, batch 64)")
    p.add_argument("--json", help="write the metrics as JSON to this file")
    p.add_argument("--write-metrics", action="store_true", help="store the metrics in the model folder's config and card")
    _add_protocol_options(p)
    p.add_argument("--plots", metavar="DIR", help="write PNG plots into DIR: 2-D embedding, Hungarian-matched "
                   "confusion and cluster galleries (k-means, cluster head), training curves with --run")
    p.add_argument("--run", metavar="DIR", help="training run folder whose log.csv gives the training curves "
                   "(default: the model folder's parent when it holds a log.csv)")
    p.add_argument("--embedding", default="tsne", choices=("tsne", "pca", "umap"),
                   help="2-D embedding of --plots (umap needs umap-learn)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("leaderboard", help="evaluate every available model on a dataset: Markdown + JSON table",
                       epilog=EPILOG_LEADERBOARD, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="dataset name")
    p.add_argument("--data-root", help="dataset folder (imagefolder, cifar10, ...)")
    p.add_argument("--protocols", default=None, help="comma list (default: every protocol that applies: knn, "
                   "linear, kmeans, fewshot, plus rlp for datasets with concepts, longtail for *_lt datasets)")
    p.add_argument("--models", default=None, help="comma list of shell patterns: registered names ('simclr_*') or "
                   "model folders ('runs/*/model'); default: every registered model with offline weights")
    p.add_argument("--out", default="leaderboard", help="folder for the table, the JSON and the per-model cache")
    p.add_argument("--sort", default=None, help="metric to sort by (default: linear_top1, else knn_top1, ...)")
    p.add_argument("--force", action="store_true", help="re-evaluate models whose cached result is current")
    p.add_argument("--update-docs", action="store_true",
                   help="replace the <!-- leaderboard:DATA start/end --> block of --docs (appended if missing)")
    p.add_argument("--docs", default="docs/benchmarks.md", help="Markdown file for --update-docs")
    p.add_argument("--update-cards", action="store_true",
                   help="write the metrics into each model folder's config.json and card (folders outside the "
                        "installed package only)")
    _add_protocol_options(p)
    p.set_defaults(func=cmd_leaderboard)

    p = sub.add_parser("publish", help="upload a model folder to the Hugging Face Hub (with a model card)",
                       epilog=EPILOG_PUBLISH, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="model folder (model.safetensors, config.json)")
    p.add_argument("--repo-id", required=True, help="Hub repository, ORG/NAME (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--token", default=None, help="Hub token (default: $HF_TOKEN or the stored login)")
    p.add_argument("--message", default=None, help="commit message")
    p.add_argument("--dry-run-to", metavar="DIR", default=None,
                   help="write the files that would be uploaded into DIR instead of uploading")
    p.set_defaults(func=cmd_publish)

    from zoo.convert.cli import register as register_convert

    register_convert(sub)
    for register in _plugins():
        register(sub)
    return parser


def _plugins():
    seen = set()
    for ep in entry_points(group="zoo.commands"):
        seen.add(ep.value.split(":")[0])
        yield ep.load()
    for module in FALLBACK_PLUGINS:
        if module in seen:
            continue
        try:
            yield importlib.import_module(module).register
        except ImportError:
            continue


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (KeyError, ValueError, FileNotFoundError, ImportError) as exc:
        from zoo.checkpoint import CheckpointError  # noqa: F401 - CheckpointError is a RuntimeError

        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
