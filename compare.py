"""Norm × batch size × seed study: every cell a real train.py + val run; study.csv, study.md and study.png.

    python compare.py --preset gn-paper                                   # BN vs GN C/16, batch 16/4/2, 3 seeds
    python compare.py --data cfg/data/synthetic.yaml --cfg cfg/models/yolo-n-bn.yaml \
        --norms bn gn:C/16 gn:32 ln in --batch-sizes 16 8 4 2 --seeds 0 1 --epochs 30 --img 320
    python compare.py --resume runs/compare/gn-paper                      # only the cells not in study.csv
    python compare.py --resume runs/compare/gn-paper --update-doc docs/compare.md

See docs/compare.md for the method.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engine.optim import NOMINAL_BATCH
from utils.general import LOGGER, ROOT, ConfigError, run_cli, setup_logging

# Study defaults for the grid flags; a preset replaces them (flags given explicitly still win).
DEFAULTS = {
    "data": str(ROOT / "cfg/data/synthetic.yaml"),
    "cfg": str(ROOT / "cfg/models/yolo-n-bn.yaml"),
    "norms": ["bn", "gn:C/16"],
    "batch_sizes": [16, 8, 4, 2],
    "seeds": [0, 1],
    "epochs": 30,
    "img": 320,
    "nbs": NOMINAL_BATCH,
}


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", help=f"dataset YAML (default {DEFAULTS['data']})")
    p.add_argument("--cfg", help=f"model YAML; its norm is replaced by each --norms entry (default {DEFAULTS['cfg']})")
    p.add_argument("--norms", nargs="+", help="norm specs to compare, e.g. bn gn:C/16 gn:32 ln in syncbn")
    p.add_argument("--batch-sizes", nargs="+", type=int, help="per-step batch sizes (each must divide --nbs)")
    p.add_argument("--nbs", type=int, help="nominal batch held fixed in every cell by gradient accumulation "
                                           "(default 64, as train.py)")
    p.add_argument("--seeds", nargs="+", type=int, help="training seeds; each (norm, batch) cell runs once per seed")
    p.add_argument("--epochs", type=int, help=f"epochs per run (default {DEFAULTS['epochs']})")
    p.add_argument("--img", type=int, help=f"train and val image size in pixels (default {DEFAULTS['img']})")
    p.add_argument("--hyp", default=None, help="hyper-parameter YAML for train.py (default: train.py's own)")
    p.add_argument("--device", default="", help="cpu, 0 or 0,1 (as train.py)")
    p.add_argument("--workers", type=int, default=-1, help="dataloader workers per run (-1: as train.py's auto)")
    p.add_argument("--nproc", type=int, default=1,
                   help="processes per run: each cell becomes a torchrun job (gloo on CPU) with the cell's batch per "
                        "process, so syncbn normalises over nproc x batch images and bn over batch")
    p.add_argument("--jobs", type=int, default=None,
                   help="cells trained side by side, each a train.py process with cores/jobs threads (default 1; "
                        "the gn-paper preset: 2). Changes no cell's settings; may be changed on --resume")
    p.add_argument("--train-args", default="",
                   help="extra train.py flags for every run, written with '=': --train-args='--cos-lr --cache ram'")
    p.add_argument("--project", default=str(ROOT / "runs/compare"))
    p.add_argument("--name", default=None, help="study folder name (default: the preset name, else 'study')")
    p.add_argument("--exist-ok", action="store_true", help="reuse project/name instead of incrementing it")
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="DIR",
                   help="continue a study folder (default: the latest under --project); finished cells are skipped")
    p.add_argument("--preset", choices=["gn-paper"], default=None, help="a ready-made study (see docs/compare.md)")
    p.add_argument("--update-doc", default=None, metavar="MD",
                   help="after the study, write study.md and study.png into MD's generated block")
    p.add_argument("--report-only", action="store_true", help="with --resume: rewrite the reports, train nothing")
    return p.parse_args(argv)


def main(opt: argparse.Namespace) -> Path:
    """Run (or resume) the study; returns the study folder."""
    from study import config as study_config
    from study import report as study_report
    from study import runner

    if opt.report_only and opt.resume is None:
        raise ConfigError("--report-only needs --resume DIR (the study whose reports to rewrite)")
    if opt.update_doc:
        study_report.check_doc(Path(opt.update_doc))  # fail now, not after an hour of training
    config, save_dir = study_config.open_study(opt, DEFAULTS)
    if opt.report_only:
        study_report.write_reports(save_dir, config, study_report.read_rows(save_dir / "study.csv"))
    else:
        runner.run_study(config, save_dir)
    LOGGER.info(f"compare: results in {save_dir} (study.csv, study.md, study.png)")
    if opt.update_doc:
        LOGGER.info(f"compare: updated {study_report.update_doc(Path(opt.update_doc), save_dir)}")
    return save_dir


def cli(argv: list[str] | None = None) -> int:
    """'error: ...' and exit 2 for bad input (run_cli); a Ctrl-C says how to continue."""
    setup_logging()
    try:
        return run_cli(main, parse_opt, argv)
    except KeyboardInterrupt:  # finished runs are already in study.csv; the interrupted one is redone on resume
        print("\ninterrupted: continue with python compare.py --resume [DIR]", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(cli())
