"""specoffload-simulate: the discrete-event simulator that checks a Plan before any run (no torch).

    from specoffload.planner.sim import simulate, SimOptions
    result = simulate(plan)              # on the profile the plan names
    print(format_report(result.report))  # simulated vs predicted, line by line
"""
from .report import AcceptanceStats, Report, comparison_rows, figures, format_report
from .simulator import Problem, SimOptions, SimResult, Simulation, resolve_profile, simulate

__all__ = ["AcceptanceStats", "Problem", "Report", "SimOptions", "SimResult", "Simulation", "comparison_rows",
           "figures", "format_report", "resolve_profile", "simulate"]
