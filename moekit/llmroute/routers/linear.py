"""Linear estimators stored as plain arrays (no pickled model objects): ridge regression and logistic regression.

Shapes: `x [Q, D]`, targets `y [Q, M]`; weights `w [D, M]`, bias `b [M]`.
"""

from __future__ import annotations

import numpy as np


def fit_ridge(x: np.ndarray, y: np.ndarray, l2: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Closed-form ridge: argmin ||x w + b - y||^2 + l2 ||w||^2. Returns (w [D, M], b [M])."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    xm, ym = x.mean(0), y.mean(0)
    xc, yc = x - xm, y - ym
    a = xc.T @ xc + l2 * np.eye(x.shape[1])
    w = np.linalg.solve(a, xc.T @ yc)
    return w, ym - xm @ w


def fit_logistic(x: np.ndarray, y: np.ndarray, c: float = 1.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One L2-regularised logistic regression per column of 0/1 targets `y [Q, M]` (scikit-learn's lbfgs).

    A column with a single class gets w = 0 and b = the logit of its (clipped) rate.
    """
    from moekit.utils.deps import require

    require("sklearn")
    from sklearn.linear_model import LogisticRegression

    y = np.asarray(y)
    w = np.zeros((x.shape[1], y.shape[1]))
    b = np.zeros(y.shape[1])
    for j in range(y.shape[1]):
        col = y[:, j] > 0.5
        if col.all() or (~col).all():
            rate = np.clip(col.mean(), 1e-3, 1 - 1e-3)
            b[j] = np.log(rate / (1 - rate))
            continue
        clf = LogisticRegression(C=c, max_iter=1000, random_state=seed)
        clf.fit(x, col)
        w[:, j], b[j] = clf.coef_[0], clf.intercept_[0]
    return w, b


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def is_binary(y: np.ndarray) -> bool:
    """True when every value of `y` is 0 or 1."""
    return bool(np.all((y == 0) | (y == 1)))
