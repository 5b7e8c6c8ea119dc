"""``densehybrid toy2d``: the 2-D toy comparison of discriminative, generative and hybrid anomaly scores."""

from __future__ import annotations

import argparse

HELP = "2-D toy experiment after TPAMI Figure 2: discriminative vs generative vs hybrid anomaly scores, over seeds"
DESCRIPTION = (
    "Train a small MLP with class logits (with a Gaussian base measure, so the density has tails) and a "
    "dataset-posterior head on a 2-D toy problem: three Gaussian inlier classes and a finite set of training "
    "negatives that covers only part of the space around them (--construction one-sided: along the upper side of "
    "the inlier border; sectors: half of the sectors around the inliers). Closed-set pre-training, then fine-tuning "
    "with the DenseHybrid loss (released weights). Compare the discriminative, generative and hybrid anomaly scores "
    "on test anomalies where no negative reached and along the inlier border, over --seeds seeds (mean ± std). "
    "Writes toy2d.png (three heatmaps of the first seed with the points) and metrics.json to --out and prints the "
    "AP/FPR95/AUROC table. The constructions follow the paper's description; its appendix was not available (see "
    "docs/toy2d.md). Choose settings with --split val (an evaluation draw independent of the test draw), never on "
    "the test numbers."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from densehybrid.cli._common import (
        add_overwrite_argument,
        device_option,
        finite_float,
        non_negative_int,
        positive_float,
        positive_int,
    )

    parser.add_argument("--out", default="runs/toy2d", help="output folder for toy2d.png and metrics.json")
    parser.add_argument(
        "--construction",
        choices=("one-sided", "sectors"),
        default="one-sided",
        help="the toy: 'one-sided' (negatives along the upper side of the inlier border, anomalies there and far "
        "below; tanh MLP, base measure fitted to the inliers, --classifier-decay 30, released likelihood term) or "
        "'sectors' (the first construction: negatives in four of eight sectors, anomalies in the others and around "
        "the inliers; ReLU MLP, fixed broad base measure, no decay, paired likelihood term)",
    )
    add_overwrite_argument(parser, "toy2d.png and metrics.json")
    parser.add_argument(
        "--seed", type=non_negative_int, default=0, help="first seed of the toy data and the model initialisation"
    )
    parser.add_argument(
        "--seeds", type=positive_int, default=5, help="number of seeds; the table gives mean ± std over them"
    )
    parser.add_argument(
        "--pretrain-steps", type=positive_int, default=1000, help="closed-set pre-training steps (full batch)"
    )
    parser.add_argument(
        "--pretrain-lr", type=positive_float, default=3e-3, help="Adam learning rate of closed-set pre-training"
    )
    parser.add_argument("--steps", type=positive_int, default=1000, help="DenseHybrid fine-tuning steps (full batch)")
    parser.add_argument(
        "--lr", type=positive_float, default=3e-4, help="initial fine-tuning learning rate (cosine decay to 0)"
    )
    parser.add_argument("--hidden", type=positive_int, default=64, help="width of the MLP's two hidden layers")
    parser.add_argument(
        "--likelihood",
        choices=("negatives", "paired"),
        default=None,
        help="likelihood term of the DenseHybrid loss: 'negatives' (released code) or 'paired' (also raises the "
        "inlier likelihood); default: the construction's (negatives for one-sided, paired for sectors)",
    )
    parser.add_argument(
        "--classifier-decay",
        type=finite_float,
        default=None,
        help="decoupled (AdamW) weight decay of the class-logit layer, >= 0, in both phases; default: the "
        "construction's (30 for one-sided, 0 for sectors)",
    )
    parser.add_argument(
        "--activation",
        choices=("tanh", "relu"),
        default=None,
        help="the MLP's nonlinearity; default: the construction's (tanh for one-sided, relu for sectors)",
    )
    parser.add_argument(
        "--base-measure",
        choices=("fitted", "isotropic"),
        default=None,
        help="Gaussian base measure of the class logits: 'fitted' to the training inliers (maximum likelihood) or "
        "'isotropic' (origin, std 3); default: the construction's (fitted for one-sided, isotropic for sectors)",
    )
    parser.add_argument(
        "--split",
        choices=("test", "val"),
        default="test",
        help="evaluation points: 'test' (the reported numbers) or 'val' (an independent draw, for choosing settings)",
    )
    parser.add_argument("--resolution", type=positive_int, default=200, help="heatmap grid points per axis")
    parser.add_argument("--device", type=device_option, default="auto", help="auto, cpu, cuda or cuda:N")


def run(args: argparse.Namespace) -> int:
    # Imported here so that `densehybrid --help` does not pay for torch and matplotlib.
    from densehybrid.engine.outputs import check_output_dir
    from densehybrid.report import format_table
    from densehybrid.toy2d import FAMILIES, SCORE_NAMES, run_toy2d

    check_output_dir(args.out, outputs=["toy2d.png", "metrics.json"], overwrite=args.overwrite)
    result = run_toy2d(
        args.out,
        seed=args.seed,
        seeds=args.seeds,
        steps=args.steps,
        device=args.device,
        pretrain_steps=args.pretrain_steps,
        hidden=args.hidden,
        lr=args.lr,
        pretrain_lr=args.pretrain_lr,
        likelihood=args.likelihood,
        resolution=args.resolution,
        split=args.split,
        construction=args.construction,
        classifier_decay=args.classifier_decay,
        activation=args.activation,
        base_measure=args.base_measure,
    )
    seeds = len(result["config"]["seeds"])
    print(format_table(result["rows"], list(FAMILIES), bold=False))
    spread = f"mean ± std over {seeds} seeds; " if seeds > 1 else "one seed, no spread; "
    print(f"(%; {spread}AP and AUROC higher is better, FPR95 lower is better)")
    for family in FAMILIES:
        wins = result["hybrid_beats_both"][family]
        counts = result["hybrid_wins"][family]
        verdict = ", ".join(
            f"{metric} {'yes' if won else 'no'} ({counts[metric]}/{seeds} seeds)" for metric, won in wins.items()
        )
        print(f"hybrid better than both components on '{family}' (means): {verdict}")
    split = result["config"]["split"]
    spread, corr = result["balance"]["inlier_spread"], result["balance"]["hybrid_rank_correlation"]
    print(
        f"spread over {split} inliers (5th-95th percentile, nats): "
        + ", ".join(f"{name} {spread[name]:.1f}" for name in SCORE_NAMES)
        + "; hybrid's rank correlation with "
        + ", ".join(f"{name} {value:.3f}" for name, value in corr.items())
    )
    reference = result["reference"]
    print(
        "reference scores (all AP; the generating density, unseen by the model, and the model's base measure "
        "alone): "
        + ", ".join(f"{name} {100 * reference[name]['all']['ap']:.1f}" for name in reference)
        + "; generative vs -ln p(x) over the inliers: correlation "
        + f"{result['balance']['generative_vs_true_density']['inlier_correlation']:.2f}"
    )
    print(
        f"construction {result['config']['construction']['name']}; closed-set accuracy on {split} inliers: "
        f"{100 * result['accuracy']:.1f}%  (scores: {', '.join(SCORE_NAMES)})"
    )
    print(f"figure: {result['figure']}")
    print(f"metrics: {result['json']}")
    return 0
