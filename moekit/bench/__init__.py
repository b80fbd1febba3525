"""Benchmarks run from the `moekit bench` command: the router leaderboard."""

from moekit.bench.routers import BUDGETS, ENTRIES, Budget, Entry, LeaderboardResult, run_leaderboard

__all__ = ["BUDGETS", "ENTRIES", "Budget", "Entry", "LeaderboardResult", "run_leaderboard"]
