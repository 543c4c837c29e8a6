"""The paper's figures (Gopalakrishnan et al. 2024, Fig. 4A/4B/5A/5B) from any scored dataset.

Works on the output of `gradcamo score` or on any Parquet/CSV profile table with the
documented columns (``Metadata_GradCAMO``, ``_Neighbors``, ``_Background``, ``_Chance``,
``Metadata_Dose``, ``Metadata_Site`` and feature columns), e.g. profiles of a user's own
plates scored elsewhere.

    python -m experiments.paper_figures --profiles PROFILES_DIR --out FIGS [--data DATASET_DIR]
    python -m experiments.paper_figures --table profiles.parquet --out FIGS --control-query "Metadata_Treatment == 'DMSO'"
"""

from __future__ import annotations

import argparse
import json

from gradcamo_jax.report import ReportConfig, figures_from_profiles, headline, make_report
from gradcamo_jax.sphering import SpherizeConfig


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--profiles", help="a `gradcamo score` output folder (full HTML report)")
    src.add_argument("--table", help="one profile table (.parquet or .csv): figures only")
    p.add_argument("--out", required=True)
    p.add_argument("--data", help="cell dataset folder, for CAM overlays (with --profiles)")
    p.add_argument("--control-query", default="Metadata_Dose == 0")
    p.add_argument("--by-plate", action="store_true", help="fit sphering per Metadata_Plate (default: global)")
    p.add_argument("--sphering", default="ZCA", help="ZCA, PCA, ZCA-cor, PCA-cor or none")
    args = p.parse_args(argv)

    sph = None
    if args.sphering.lower() != "none":
        sph = SpherizeConfig(args.sphering, control_query=args.control_query,
                             by=("Metadata_Plate",) if args.by_plate else ())
    config = ReportConfig(sphering=sph)
    if args.profiles:
        print(make_report(args.profiles, args.out, data_dir=args.data, config=config))
        return
    from gradcamo_jax.data import formats

    table = formats.read_table(args.table)
    figs = figures_from_profiles(table, args.out, config)
    print(json.dumps({"figures": {k: str(v) for k, v in figs.items()}, "headline": headline(table)}, indent=1))


if __name__ == "__main__":
    main()
