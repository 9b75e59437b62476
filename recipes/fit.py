"""Fit scaling laws to a sweep of BP, DFA and shallow runs, and report whether DFA pays off against BP.

    python recipes/fit.py runs/sweep --out runs/sweep/report
    python recipes/fit.py runs/sweep --out runs/sweep/report_paper --compute paper --max_saving 2 --bootstrap 500

SWEEP_DIR contains one folder per training run (nested at most one level deeper), each with the `run.json` and
`metrics.jsonl` written by `recipes/train.py`. The recipe writes to `--out`:

- `report.md`: fitted laws with 95% bootstrap intervals, the parametric law L(N, D), the break-even table, the
  extrapolation and ordering checks, the conclusion and the runs used and excluded;
- `fits.json`: every number of the report;
- `loss_vs_compute`, `loss_vs_params`, `breakeven` and, when the runs logged alignment metrics, `alignment`
  figures, each as PNG and SVG.
"""

import argparse
import logging
import sys

from hf_dfa.analysis import DEFAULT_FIT_FROM, analyse_sweep
from hf_dfa.plots import write_figures
from hf_dfa.report import write_fits_json, write_report
from hf_dfa.sweep_reader import COMPUTE_MODES, SweepError, load_sweep


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("sweep_dir", help="Directory that contains one folder per training run.")
    parser.add_argument("--out", required=True, help="Directory for report.md, fits.json and the figures.")

    parser.add_argument(
        "--max_saving",
        type=float,
        default=1.5,
        help="Largest factor by which DFA's compute per token could plausibly shrink relative to BP; DFA counts as "
        "better at a budget when it needs at most this factor times BP's compute. Default: 1.5.",
    )
    parser.add_argument(
        "--bootstrap",
        type=int,
        default=200,
        help="Bootstrap resamples of the runs for the 95%% intervals of the frontier laws; 0 skips them. Default: 200.",
    )
    parser.add_argument(
        "--compute",
        choices=COMPUTE_MODES,
        default="counted",
        help="`counted`: training FLOPs logged by each run for the rule that was run. `paper`: 6 * N * D for every "
        "rule, with N the non-embedding parameters and D the training tokens. Default: counted.",
    )
    parser.add_argument(
        "--fit_from",
        type=float,
        default=DEFAULT_FIT_FROM,
        help="Leave out of the fits the eval points before this fraction of each run's final token count, where "
        "the loss is still near its initial value or in the warm-up transient; 0 keeps every point. The figures "
        f"still draw them. Default: {DEFAULT_FIT_FROM}.",
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of the bootstrap. Default: 0.")

    args = parser.parse_args(argv)
    if not 0 <= args.fit_from < 1:
        parser.error(f"--fit_from must be at least 0 and below 1, got {args.fit_from}.")
    if not args.max_saving > 0:
        parser.error(f"--max_saving must be positive, got {args.max_saving}.")
    if args.bootstrap < 0:
        parser.error(f"--bootstrap must be 0 or positive, got {args.bootstrap}.")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    try:
        sweep = load_sweep(args.sweep_dir)
    except SweepError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1

    analysis = analyse_sweep(
        sweep,
        compute=args.compute,
        max_saving=args.max_saving,
        n_bootstrap=args.bootstrap,
        seed=args.seed,
        fit_from=args.fit_from,
    )
    figures = write_figures(analysis, args.out)
    report = write_report(analysis, args.out, [path for path in figures if path.endswith(".png")], args.bootstrap)
    fits = write_fits_json(analysis, args.out)

    print(f"{len(sweep.runs)} runs used, {len(sweep.excluded)} excluded, compute: {analysis.compute_label}")
    for rule, forms in analysis.laws.items():
        for form, fit in forms.items():
            extra = f", E = {fit.E:.3g}" if form == "saturating" else ""
            print(f"  {rule:8s} {form:10s} C_c = {fit.C_c:.3g}, alpha = {fit.alpha:.3g}{extra}")
    print(analysis.conclusion)
    print(f"report: {report}")
    print(f"fits:   {fits}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
