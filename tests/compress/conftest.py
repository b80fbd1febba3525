"""The CLI tests here reuse the CLI suite's data cache and trained micro run."""

from tests.cli.conftest import _cache, _trained, cache_dir, trained_run  # noqa: F401
