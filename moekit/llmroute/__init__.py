"""Routing whole queries among LLMs by cost and quality. Stands apart from the rest of moekit.

It never imports torch. Modules (see docs/llmroute.md):
- `table`: `RoutingTable` (queries x models: quality, cost, categories) and train/val/test splits.
- `loaders`: RouterBench, SPROUT and RouteLLM files -> `RoutingTable`; `prices`: price tables, token estimates.
- `embed`: local query embeddings (TF-IDF + SVD; sentence-transformers when installed), cached per dataset.
- `routers`: one router per file, registered by name (`routers.create("knn", k=40)`, `routers.list_routers()`).
- `metrics`: PGR, APGR, CPT, cost cut, AIQ, Pareto frontier, per-category audit; `evaluate`: sweeps and metrics.
- `pipeline`: train / save / load / evaluate routers from a dataset (what `moekit route` calls); `plots`.
- `config`, `server`: the OpenAI-compatible router server (`moekit route serve --config routes.yaml`); `wire`:
  the OpenAI request, response and stream formats it speaks.
- `fakes`, `localserve`: a fake backend and a thread-run uvicorn for tests and benchmarks.
Optional dependencies are checked in `moekit.utils.deps`, as everywhere in moekit.
"""
