"""Benchmarks run from the `moekit bench` command: the router leaderboard (`routers`, built from `entries`,
`measure` and `report`)."""

from moekit.bench.entries import BUDGETS, ENTRIES, Budget, Entry
from moekit.bench.routers import LeaderboardResult, run_leaderboard

__all__ = ["BUDGETS", "ENTRIES", "Budget", "Entry", "LeaderboardResult", "run_leaderboard"]
