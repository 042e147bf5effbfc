"""Two-sample tests for the statistical checks (torch only: scipy is not a pinned dependency)."""
import torch


def chi2_homogeneity_p(a: torch.Tensor, b: torch.Tensor) -> float:
    """p-value of a chi-square test that two histograms (same bins) come from one distribution."""
    a, b = a.double(), b.double()
    keep = (a + b) > 0
    a, b = a[keep], b[keep]
    na, nb = a.sum(), b.sum()
    tot = a + b
    ea, eb = tot * na / (na + nb), tot * nb / (na + nb)
    stat = (((a - ea) ** 2) / ea + ((b - eb) ** 2) / eb).sum()
    dof = keep.sum().item() - 1
    if dof == 0:
        return 1.0
    return torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.double), stat / 2).item()


def ks_2samp_p(x, y) -> float:
    """Two-sample Kolmogorov-Smirnov p-value (asymptotic; conservative for discrete data)."""
    x = torch.as_tensor(x).double().flatten().sort().values
    y = torch.as_tensor(y).double().flatten().sort().values
    grid = torch.cat([x, y])
    cdf = lambda s: torch.searchsorted(s, grid, right=True).double() / len(s)  # noqa: E731
    d = (cdf(x) - cdf(y)).abs().max().item()
    en = (len(x) * len(y) / (len(x) + len(y))) ** 0.5
    lam = (en + 0.12 + 0.11 / en) * d
    j = torch.arange(1, 101, dtype=torch.double)
    return float((2 * ((-1) ** (j - 1)) * torch.exp(-2 * j ** 2 * lam ** 2)).sum().clamp(0, 1))


def mean_close(x: torch.Tensor, y: torch.Tensor, n_se: float = 4.0) -> bool:
    """The means differ by less than ``n_se`` standard errors of their difference."""
    x, y = x.double(), y.double()
    se = (x.var() / len(x) + y.var() / len(y)).sqrt()
    return bool((x.mean() - y.mean()).abs() < n_se * se)
