"""The comparisons of a study: Welch's t-test of two configurations, or the one-sample t-test against a
published figure, with 95 % confidence intervals and the power of the test (scipy.stats)."""

import math
import statistics
import warnings

ALPHA, POWER = 0.05, 0.8  # two-sided significance level; the power a study's seeds are judged by


def power(diff: float, var_a: float, n_a: int, var_b: float | None = None, n_b: int = 0) -> float:
    """The power of the two-sided t-test at :data:`ALPHA` (Welch's; one-sample when ``var_b`` is None) to
    detect a true difference ``diff`` with these sample variances and sizes: the noncentral t (scipy)."""
    from scipy import stats
    va, vb = var_a / n_a, (var_b / n_b if var_b is not None else 0.0)
    df = n_a - 1 if var_b is None else (va + vb) ** 2 / (va ** 2 / (n_a - 1) + vb ** 2 / (n_b - 1))
    crit, nc = stats.t.ppf(1 - ALPHA / 2, df), abs(diff) / math.sqrt(va + vb)
    wrong_tail = stats.nct.cdf(-crit, df, nc)  # below 1e-10 from nc = 5; NaN in scipy far out
    return float(stats.nct.sf(crit, df, nc) + (0.0 if math.isnan(wrong_tail) else wrong_tail))


def detectable(var_a: float, n_a: int, var_b: float | None = None, n_b: int = 0) -> float:
    """The smallest difference these runs detect with :data:`POWER` (80 %): :func:`power`'s root (brentq)."""
    from scipy.optimize import brentq
    se = math.sqrt(var_a / n_a + (var_b / n_b if var_b is not None else 0.0))
    return float(brentq(lambda d: power(d, var_a, n_a, var_b, n_b) - POWER, 0.0, 100 * se))


def seeds_needed(diff: float, var_a: float, var_b: float | None = None, most: int = 100_000) -> int | None:
    """The fewest seeds per arm (both arms alike) at which :func:`power` to detect ``diff`` with these
    variances reaches :data:`POWER`; None beyond ``most``. Cohen (1988), table 2.4.1: d = 0.5 needs 64."""
    low, high = 1, most  # power grows with n: bisect between a short and a long enough n
    if power(diff, var_a, high, var_b, high) < POWER:
        return None
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if power(diff, var_a, middle, var_b, middle) >= POWER else (middle, high)
    return high


def compare(a: list[float], b: list[float] | None = None, published: float | None = None) -> dict:
    """Difference of means, its 95 % confidence interval and a two-sided t-test: ``mean(a) − mean(b)``
    with Welch's t-test (unequal variances), or ``mean(a) − published`` with the one-sample t-test.

    Returns:
        ``{"diff", "low", "high", "t", "df", "p", "n_a", "n_b", "significant", "detectable", "seeds_needed"}``;
        ``t``, ``p``, ``low``, ``high`` NaN (not significant) when there is no test: fewer than 2 values in a
        group, no spread. ``detectable``: the smallest difference these runs detect with 80 % power
        (:func:`detectable`); ``seeds_needed``: for a difference that is not significant, the seeds per arm
        that would detect it (:func:`seeds_needed`; None: more than 100,000, or significant, or no test).
    """
    from scipy import stats  # imported here: only reports need it
    shift = 0.0 if b is not None else published  # the one-sample interval is of mean(a): shifted
    t = p = df = low = high = math.nan
    if len(a) > 1 and (b is None or len(b) > 1):
        with warnings.catch_warnings():  # identical values: scipy warns and returns NaN, reported as "no test"
            warnings.simplefilter("ignore", RuntimeWarning)
            r = stats.ttest_1samp(a, published) if b is None else stats.ttest_ind(a, b, equal_var=False)
            ci = r.confidence_interval(1 - ALPHA)
        t, p, df, low, high = (float(v) for v in (r.statistic, r.pvalue, r.df, ci.low - shift, ci.high - shift))
    if not math.isfinite(t):  # no spread (t = ±inf or 0/0): no test rather than a p of 0
        t = p = low = high = math.nan
    diff, detect, needed = statistics.fmean(a) - (statistics.fmean(b) if b is not None else published), math.nan, None
    if not math.isnan(p):
        var_a, var_b = statistics.variance(a), statistics.variance(b) if b is not None else None
        detect = detectable(var_a, len(a), var_b, len(b) if b is not None else 0)
        needed = seeds_needed(diff, var_a, var_b) if p >= ALPHA else None
    return {"diff": diff, "low": low, "high": high, "t": t, "df": df, "p": p, "n_a": len(a),
            "n_b": len(b) if b is not None else 0, "significant": bool(p < ALPHA), "detectable": detect,
            "seeds_needed": needed}
