"""Benchmarks behind `moekit bench` and `moekit demo`: the router leaderboard (`routers`, built from `entries`,
`measure` and `report`) and the one-batch router survey (`survey`)."""

from moekit.bench.entries import BUDGETS, ENTRIES, Budget, Entry
from moekit.bench.routers import LeaderboardResult, run_leaderboard

__all__ = ["BUDGETS", "ENTRIES", "Budget", "Entry", "LeaderboardResult", "run_leaderboard"]
