"""Every PuLP call in the project lives here: build, solve, check status by name, read back.

The model is given as plain data (variables with bounds, an objective, named linear constraints),
so callers never touch pulp objects and tests can pose hand-solvable instances.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import pulp

SENSES = {"<=": pulp.LpConstraintLE, ">=": pulp.LpConstraintGE, "==": pulp.LpConstraintEQ}


class LpError(RuntimeError):
    """The solver did not return an optimum; `status` is PuLP's status name."""

    def __init__(self, message: str, status: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Variable:
    name: str
    low: float = 0.0
    high: float | None = None
    integer: bool = False


@dataclass(frozen=True)
class Constraint:
    """sum(coef[v] * v) <sense> rhs, under a name that errors and reports use."""

    name: str
    coef: dict[str, float]
    sense: str
    rhs: float


@dataclass(frozen=True)
class Solution:
    status: str
    objective: float
    values: dict[str, float]
    slack: dict[str, float]  # constraint name -> slack at the optimum (0: binding)

    def binding(self, prefix: str = "", tol: float = 1e-7) -> list[str]:
        return [n for n, s in self.slack.items() if n.startswith(prefix) and abs(s) <= tol * (1 + abs(s))]


def _solver():
    """CBC as bundled with PuLP (PULP_CBC_CMD warns of its removal in PuLP 4, hence the pin below 4)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return pulp.PULP_CBC_CMD(msg=False, gapRel=1e-9)


def minimize(name: str, variables: list[Variable], objective: dict[str, float],
             constraints: list[Constraint], objective_const: float = 0.0) -> Solution:
    """Solve min objective·x s.t. constraints with CBC; raise LpError unless the status is Optimal."""
    prob = pulp.LpProblem(name, pulp.LpMinimize)
    # PuLP 3.x attaches variables to the problem; older releases build them free-standing.
    make = getattr(prob, "add_variable", None) or (lambda n, **kw: pulp.LpVariable(n, **kw))
    xs = {v.name: make(v.name, lowBound=v.low, upBound=v.high,
                       cat=pulp.LpInteger if v.integer else pulp.LpContinuous)
          for v in variables}
    prob += pulp.lpSum(c * xs[v] for v, c in objective.items()) + objective_const, "objective"
    for c in constraints:
        unknown = set(c.coef) - set(xs)
        if unknown:
            raise ValueError(f"constraint {c.name} uses unknown variables {sorted(unknown)}")
        expr = pulp.lpSum(coef * xs[v] for v, coef in c.coef.items())
        prob += pulp.LpConstraint(expr, sense=SENSES[c.sense], rhs=c.rhs, name=c.name)
    prob.solve(_solver())
    status = pulp.LpStatus[prob.status]
    if status != "Optimal":
        raise LpError(f"LP '{name}' is {status}", status)
    values = {n: float(x.value() or 0.0) for n, x in xs.items()}
    slack = {}
    for c in constraints:
        lhs = sum(coef * values[v] for v, coef in c.coef.items())
        slack[c.name] = (c.rhs - lhs) if c.sense == "<=" else (lhs - c.rhs) if c.sense == ">=" else 0.0
    return Solution(status, float(pulp.value(prob.objective)), values, slack)
