"""The Optuna search's sampler (``hparams_search=optuna``; the ``optuna`` extra)."""

import optuna


class TrialSeededTPE(optuna.samplers.BaseSampler):
    """Optuna's TPE sampler (Bergstra et al. 2011) seeded per trial, with ``seed + trial number``: one worker
    proposes the same trials in the same order, and workers that share a storage, where each trial's number
    is unique, propose different trials without a seed each. Keyword arguments are ``TPESampler``'s."""

    def __init__(self, seed: int | None = None, **kwargs):
        self.seed, self.kwargs = seed, kwargs
        self.samplers: dict[int, optuna.samplers.TPESampler] = {}  # the current trial's

    def of(self, trial) -> optuna.samplers.TPESampler:
        if trial.number not in self.samplers:
            seed = None if self.seed is None else self.seed + trial.number
            self.samplers = {trial.number: optuna.samplers.TPESampler(seed=seed, **self.kwargs)}
        return self.samplers[trial.number]

    def infer_relative_search_space(self, study, trial):
        return self.of(trial).infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self.of(trial).sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self.of(trial).sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values):
        self.of(trial).after_trial(study, trial, state, values)
