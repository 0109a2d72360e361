"""Nuisance hyper-parameters tuned for each arm of a study (Google's Deep Learning Tuning Playbook): the two
sweeps of such a study, each arm's choice on validation, and the final runs' configs."""

from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from mnist_lab.config import load_config, parse_overrides
from mnist_lab.errors import ConfigError
from mnist_lab.results import config_label, factors, matches, read_summary
from mnist_lab.resuming import check_sweep_dir


def phases(argv: list[str]) -> list[list[str]]:
    """The sweeps of a command line: itself, or for a study with ``nuisance`` (a sweep) its two phases into its
    one study dir D: the nuisance trials into ``D/nuisance`` (every arm at every nuisance value, at the study's
    first seed, ``test=false``), then the final runs into D (every arm and seed at its arm's choice,
    :func:`tuned`). ``D/multirun.yaml`` is saved first: ``-m resume=D`` continues in whichever phase it died.

    Raises:
        ConfigError: a new study into a dir that holds one, or that cannot be written.
    """
    parsed = OverridesParser.create().parse_overrides([a for a in argv[1:] if "=" in a and not a.startswith("-")])
    if "study" not in {o.key_or_group for o in parsed}:
        return [argv]
    cfg = load_config([o.input_line for o in parsed if not o.is_sweep_override()], hydra=True)  # sweeps: -m's
    if not OmegaConf.select(cfg, "study.nuisance"):
        return [argv]
    study, trials, nuisance = Path(cfg.hydra.sweep.dir), Path(cfg.hydra.sweep.dir) / "nuisance", cfg.study.nuisance
    check_sweep_dir(study, cfg.get("resume"))
    if not cfg.get("resume"):  # the command, as resuming.sweep_command reads it
        lines = {kind: [o.input_line for o in parsed if o.is_hydra_override() == (kind == "hydra")]
                 for kind in ("task", "hydra")}
        OmegaConf.save({"hydra": {"overrides": lines}}, study / "multirun.yaml")
    seeds = next((o for o in parsed if o.key_or_group == "seed"), None) or OverridesParser.create().parse_override(
        f"seed={OmegaConf.select(cfg, 'hydra.sweeper.params.seed', default=cfg.seed)}")  # the trials': the first
    seed = next(seeds.sweep_string_iterator()) if seeds.is_sweep_override() else seeds.get_value_element_as_str()
    base = [a for a in argv if a.split("=", 1)[0] not in ("hydra.sweep.dir", "resume")]
    return [[*(a for a in base if a.split("=", 1)[0] not in ("seed", *nuisance)), f"hydra.sweep.dir={trials}",
             f"seed={seed}", "test=false",
             *(f"{k}={','.join(map(str, v))}" for k, v in nuisance.items()),
             *([f"resume={trials}"] if (trials / "multirun.yaml").is_file() else [])],
            [*base, f"hydra.sweep.dir={study}", f"resume={study}"]]


def choices(trials: pd.DataFrame, nuisance: Sequence[str]) -> tuple[pd.DataFrame, list[str]]:
    """Each arm's best completed nuisance trial by validation accuracy (``best_val/acc``; on a tie the first
    in grid order): the rows of ``trials`` (their jobs table), and the arm keys (the factors not in ``nuisance``)."""
    arms = [k for k in factors(trials) if k not in nuisance]
    done = trials[trials["status"] == "completed"]
    ranked = done.assign(rank=pd.to_numeric(done["best_val/acc"])).sort_values("rank", ascending=False, kind="stable")
    best = ranked.groupby(arms, sort=False).head(1) if arms else ranked.head(1)
    return best.drop(columns="rank").sort_index(), arms


def tuned(cfg: DictConfig, task: Sequence[str], sweep_dir: Path) -> DictConfig:
    """A final run of a study with ``nuisance``: ``cfg`` with each nuisance key at its arm's choice
    (:func:`choices` of the trials' ``sweep_dir/nuisance/summary.csv``, the table the report reads too; the
    arm: the job's overrides ``task`` on the arm keys). Any other run's config is returned as it is.

    Raises:
        ConfigError: the trials have no summary, or no completed trial of the arm.
    """
    nuisance, summary = OmegaConf.select(cfg, "study.nuisance"), sweep_dir / "nuisance" / "summary.csv"
    if not nuisance or not cfg.get("test", True):
        return cfg
    if not summary.is_file():
        raise ConfigError(f"study {cfg.study.name}: {summary} is missing; write it with python "
                          f"scripts/summarize_sweep.py {summary.parent}, then continue with -m resume={sweep_dir}")
    best, arms = choices(read_summary(summary), list(nuisance))
    arm = {k: v for k, v, _ in parse_overrides(task) if k in arms}
    chosen = best[matches(best, arm)]
    if chosen.empty:
        raise ConfigError(f"study {cfg.study.name}: no completed nuisance trial of {config_label(arm)} in "
                          f"{sweep_dir / 'nuisance'}; see its summary.md")
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist([f"{k}={chosen.iloc[0][k]}" for k in nuisance]))
