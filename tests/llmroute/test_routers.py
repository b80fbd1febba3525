"""Every router on a synthetic table with a known best policy; the contract over every registered router."""

from __future__ import annotations

import numpy as np
import pytest

from moekit.llmroute.evaluate import audit, evaluate, sweep
from moekit.llmroute.routers import create, get, list_routers, load_router
from moekit.llmroute.routers.mf import mf_loss_and_grads
from moekit.llmroute.routers.mlp import MLPRouter
from tests.llmroute.synth import best_policy

POLICY_ARGS = {
    "routes": [
        {"name": "maths", "description": "solve an equation, integral, derivative, algebra", "model": "strong"},
        {"name": "smalltalk", "description": "a joke, the weather, a movie, a recipe", "model": "weak"},
    ],
    "default": "weak",
}
ARGS = {
    "policy": POLICY_ARGS,
    "flags": {
        "base": "knn",
        "base_args": {"k": 5},
        "penalties": {"size": 0.0},
        "attributes": {"weak": {"size": 7}, "strong": {"size": 1000}},
    },
    "knn": {"k": 5},
    "cascade": {"k": 5},
    "mlp": {"hidden": 16, "max_iter": 300},
    "mf": {"dim": 8, "epochs": 60, "lr": 1e-2},
    "category": {"prior": 2.0},
    "ensemble": {"members": [{"name": "category", "args": {"prior": 2.0}}, {"name": "knn", "args": {"k": 5}}]},
}
LEARNED = ["knn", "mlp", "carrot", "mf", "threshold", "cascade", "policy", "flags", "category", "ensemble"]


def fit(name, synthetic):
    train, _, emb, x_train, _ = synthetic
    return create(name, **ARGS.get(name, {})).fit(train, x_train, embedder=emb)


def test_registry_lists_every_router_and_rejects_unknown_names():
    names = list_routers()
    for n in [
        "random",
        "oracle",
        "best",
        "zero",
        "threshold",
        "knn",
        "mlp",
        "mf",
        "carrot",
        "cascade",
        "policy",
        "flags",
    ]:
        assert n in names
    with pytest.raises(KeyError, match="known routers: .*knn"):
        get("nope")


@pytest.mark.parametrize("name", sorted(set(list_routers())))
def test_contract_every_router(name, synthetic, tmp_path):
    train, test, _, _, x_test = synthetic
    r = fit(name, synthetic)
    choice = r.route(x_test, 0.3, test)
    assert choice.shape == (len(test),) and choice.dtype.kind == "i"
    assert set(np.unique(choice)) <= {0, 1}
    assert r.strong_score(x_test, test).shape == (len(test),)
    with pytest.raises(ValueError, match="mu"):
        r.route(x_test, 1.5, test)
    r.save(tmp_path / name)
    back = load_router(tmp_path / name)
    for mu in (0.0, 0.3, 1.0):
        np.testing.assert_array_equal(back.route(x_test, mu, test), r.route(x_test, mu, test))
    np.testing.assert_allclose(back.strong_score(x_test, test), r.strong_score(x_test, test), rtol=1e-6)


def test_failed_save_leaves_the_saved_router_whole_and_no_temp_files(synthetic, tmp_path, monkeypatch):
    _, test, _, _, x_test = synthetic
    r = fit("knn", synthetic)
    r.save(tmp_path / "r")
    before = {p.name: p.read_bytes() for p in (tmp_path / "r").iterdir()}

    def disk_full(file, *args, **kwargs):
        (open(file, "wb") if isinstance(file, str | type(tmp_path)) else file).write(b"PK partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", disk_full)
    r.args["k"] = 99  # a changed router.json, were it written
    with pytest.raises(OSError, match="No space"):
        r.save(tmp_path / "r")
    assert {p.name: p.read_bytes() for p in (tmp_path / "r").iterdir()} == before
    monkeypatch.undo()
    np.testing.assert_array_equal(load_router(tmp_path / "r").route(x_test, 0.3, test), r.route(x_test, 0.3, test))


@pytest.mark.parametrize("name", LEARNED)
def test_learned_routers_find_the_best_policy(name, synthetic):
    _, test, _, _, x_test = synthetic
    r = fit(name, synthetic)
    mu = 0.5 if name in ("threshold", "mf", "cascade") else 0.1  # threshold-style knobs are probabilities
    choice = r.route(x_test, mu, test)
    assert np.mean(choice == best_policy(test)) >= 0.95


@pytest.mark.parametrize("name", ["knn", "mlp", "carrot", "mf", "threshold", "cascade", "category"])
def test_learned_routers_rank_queries_like_the_oracle(name, synthetic):
    _, test, _, _, x_test = synthetic
    ev = evaluate(fit(name, synthetic), x_test, test)
    # math queries (the only ones the strong model helps) come first, as for the oracle:
    # PGR rises linearly to 1 at the math share, then stays flat -> APGR = 1 - share / 2
    share = np.mean(best_policy(test))
    assert ev.cpt80 <= 0.8 * share + 0.03
    assert ev.apgr >= 1 - share / 2 - 0.02


def test_oracle_random_best_zero_on_the_synthetic_table(synthetic):
    train, test, _, x_train, x_test = synthetic
    oracle = evaluate(fit("oracle", synthetic), x_test, test)
    rand = evaluate(fit("random", synthetic), x_test, test)
    # oracle: PGR 1 at the math share, then flat (chat queries are ties): APGR = 1 - share/2
    share = np.mean(best_policy(test))
    assert oracle.apgr == pytest.approx(1 - share / 2, abs=1e-9)
    # target .95 x 1.0: the chat half plus n math queries with (30 + n) / 60 >= .95 -> n = 27 strong calls
    assert len(test) == 60
    assert oracle.cost_cut == pytest.approx(1 - (27 * 1.0 + 33 * 0.1) / 60, abs=1e-9)
    assert rand.apgr == pytest.approx(0.5, abs=0.15)
    best = fit("best", synthetic)
    assert (best.route(x_test, 0.0) == 1).all() and (best.route(x_test, 1.0) == 0).all()
    with pytest.raises(ValueError, match="true table"):
        fit("oracle", synthetic).route(x_test, 0.5)


def test_zero_router_mixes_along_the_hull():
    from moekit.llmroute.table import RoutingTable

    q = 4000
    t = RoutingTable(
        [f"q{i}" for i in range(q)], ["a", "b", "c"], np.tile([0.5, 0.6, 0.9], (q, 1)), np.tile([1.0, 2.0, 3.0], (q, 1))
    )
    z = create("zero").fit(t, np.zeros((q, 1)))
    assert z.hull.tolist() == [0, 2]  # b lies below the chord a-c
    assert z.mixture(0.0) == (0, 2, 1.0)
    assert z.mixture(0.5) == (0, 2, 0.5)
    assert z.mixture(1.0) == (0, 2, 0.0)
    cost, quality = sweep(z, np.zeros((q, 1)), t, [0.5])
    assert cost[0] == pytest.approx(2.0, abs=0.05) and quality[0] == pytest.approx(0.7, abs=0.01)


def test_threshold_calibration_hits_the_target_share(synthetic):
    _, test, _, _, x_test = synthetic
    r = fit("threshold", synthetic)
    for share in (0.25, 0.5, 0.75):
        alpha = r.calibrate(x_test, share)
        got = np.mean(r.route(x_test, alpha) == r.strong)
        assert got == pytest.approx(share, abs=1.5 / len(test))
    assert r.calibrate(x_test, 0.0) == 1.0 and r.calibrate(x_test, 1.0) == 0.0


def test_carrot_mu_trades_quality_for_cost(synthetic):
    _, test, _, _, x_test = synthetic
    cost, quality = sweep(fit("carrot", synthetic), x_test, test, [0.0, 0.1, 1.0])
    assert quality[1] == pytest.approx(1.0) and cost[1] < cost[0] + 1e-12
    assert cost[2] == pytest.approx(0.1) and quality[2] == pytest.approx(0.5, abs=0.05)


def test_cascade_pays_for_every_call_it_makes(synthetic):
    _, test, _, _, x_test = synthetic
    r = fit("cascade", synthetic)
    choice = np.array([0, 1] * (len(test) // 2))
    np.testing.assert_allclose(r.paid(choice, test), np.where(choice == 1, 1.1, 0.1))
    assert r.route(x_test, 1.0).tolist() == [0] * len(test)  # tau = 0: the first model always stops


def test_policy_router_matches_descriptions(synthetic):
    _, test, _, _, x_test = synthetic
    r = fit("policy", synthetic)
    names = r.matched_route(x_test)
    expected = ["maths" if c == "math" else "smalltalk" for c in test.categories]
    assert np.mean([a == b for a, b in zip(names, expected, strict=True)]) >= 0.95
    with pytest.raises(ValueError, match="default"):
        create("policy", routes=POLICY_ARGS["routes"])


def test_flags_penalty_on_size_moves_calls_to_the_small_model(synthetic):
    _, test, _, _, x_test = synthetic
    train, _, emb, x_train, _ = synthetic
    args = dict(ARGS["flags"], penalties={"size": 2.0})
    r = create("flags", **args).fit(train, x_train)
    assert (r.route(x_test, 0.1) == 0).all()  # a size penalty of 2 outweighs any quality gain
    assert np.mean(fit("flags", synthetic).route(x_test, 0.1) == best_policy(test)) >= 0.95
    with pytest.raises(ValueError, match="unknown penalties"):
        create("flags", penalties={"colour": 1.0})


def test_audit_per_category(synthetic):
    _, test, _, _, x_test = synthetic
    cats, shares = audit(fit("knn", synthetic), x_test, test, 0.1)
    assert cats == ["chat", "math"]
    assert shares[0, 0] >= 0.95 and shares[1, 1] >= 0.95


def test_mf_gradients_match_finite_differences():
    rng = np.random.default_rng(0)
    params = {
        "P": rng.normal(size=(5, 3)),
        "V": rng.normal(size=(3, 3)),
        "w": rng.normal(size=3),
        "b": rng.normal(size=3),
    }
    x = rng.normal(size=(7, 5))
    y = (rng.random((7, 3)) < 0.5).astype(float)
    _, grads = mf_loss_and_grads(params, x, y, pointwise=0.7, l2=0.01)
    for k, v in params.items():
        num = np.zeros_like(v)
        for idx in np.ndindex(v.shape):
            old = v[idx]
            v[idx] = old + 1e-6
            lp, _ = mf_loss_and_grads(params, x, y, 0.7, 0.01)
            v[idx] = old - 1e-6
            lm, _ = mf_loss_and_grads(params, x, y, 0.7, 0.01)
            v[idx] = old
            num[idx] = (lp - lm) / 2e-6
        np.testing.assert_allclose(grads[k], num, rtol=1e-4, atol=1e-7, err_msg=k)


def test_mlp_numpy_forward_matches_sklearn(synthetic):
    from sklearn.neural_network import MLPRegressor

    train, test, _, x_train, x_test = synthetic
    net = MLPRegressor(hidden_layer_sizes=(16,), max_iter=500, random_state=0).fit(x_train, train.quality)
    r = MLPRouter()
    r.weights, r.biases = net.coefs_, net.intercepts_
    np.testing.assert_allclose(r.forward(x_test), net.predict(x_test), rtol=1e-6, atol=1e-8)


def test_embedding_dimension_mismatch_is_named(synthetic):
    r = fit("knn", synthetic)
    with pytest.raises(ValueError, match="D=8"):
        r.predict(np.zeros((2, 3)))


def test_category_router_learns_per_category_means(synthetic):
    _, test, _, _, x_test = synthetic
    r = fit("category", synthetic)
    assert r.categories == ["chat", "math"]
    # shrinkage by 2 pseudo-queries at the overall mean 0.5: weak on chat (60 + 2 x 0.5) / 62, on math
    # (0 + 2 x 0.5) / 62; the strong model is always right
    np.testing.assert_allclose(r.cat_quality, [[61 / 62, 1.0], [1 / 62, 1.0]])
    probs = r.category_probs(x_test)
    assert np.mean(probs.argmax(1) == (np.asarray(test.categories) == "math")) >= 0.95


def test_ensemble_averages_its_members(synthetic):
    train, test, emb, x_train, x_test = synthetic
    r = create("ensemble", members=[{"name": "knn", "args": {"k": 5}}, {"name": "best"}], weights=[3, 1])
    r.fit(train, x_train)
    knn = create("knn", k=5).fit(train, x_train).predict(x_test)
    best = create("best").fit(train, x_train).predict(x_test)
    got = r.predict(x_test)
    np.testing.assert_allclose(got.quality, 0.75 * knn.quality + 0.25 * best.quality, rtol=1e-6)
    np.testing.assert_allclose(got.cost, 0.75 * knn.cost + 0.25 * best.cost, rtol=1e-6)
    with pytest.raises(ValueError, match="does not predict"):
        create("ensemble", members=[{"name": "oracle"}])


def test_randomised_baselines_average_draws(synthetic):
    from moekit.llmroute.evaluate import mean_evaluation

    train, test, _, x_train, x_test = synthetic
    draws = [evaluate(create("random", seed=s).fit(train, x_train), x_test, test) for s in range(10)]
    ev = mean_evaluation(draws, "random")
    apgrs = [d.apgr for d in draws]
    assert len(set(apgrs)) > 1  # the draws differ
    assert ev.apgr == pytest.approx(np.mean(apgrs)) and ev.spread["apgr"] == pytest.approx(np.std(apgrs))
    assert ev.cost_cut == pytest.approx(np.nanmean([d.cost_cut for d in draws]))
    np.testing.assert_allclose(ev.curve.pgr, np.mean([d.curve.pgr for d in draws], axis=0))
    row = ev.row()
    assert row["draws"] == 10 and row["apgr_std"] == pytest.approx(np.std(apgrs)) and "cpt50_std" in row


def _one_category(table):
    from moekit.llmroute.table import RoutingTable

    return RoutingTable(table.queries, table.models, table.quality, table.cost, ["gsm8k"] * len(table))


def test_single_category_tables_say_why_category_routing_cannot_run(synthetic, tmp_path):
    from moekit.llmroute.table import SplitConfig, split_rows

    train, test, emb, x_train, x_test = synthetic
    one = _one_category(train)
    with pytest.raises(ValueError, match=r"single category \['gsm8k'\].*needs at least 2") as e:
        create("category").fit(one, x_train)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"single category \['gsm8k'\].*--split query") as e:
        split_rows(one, SplitConfig(by="category"))
    assert "\n" not in str(e.value)
    # the ensemble leaves the category member out, warns naming it, and routes with the others
    members = [{"name": "category"}, {"name": "knn", "args": {"k": 5}}, {"name": "carrot"}]
    with pytest.warns(UserWarning, match=r"left out members that cannot train: category \(member 0\)"):
        ens = create("ensemble", members=members, weights=[2.0, 1.0, 3.0]).fit(one, x_train, embedder=emb)
    assert ens.kept == [1, 2] and [m.name for m in ens.members] == ["knn", "carrot"]
    np.testing.assert_allclose(ens.weights, [0.25, 0.75])
    knn, carrot = ens.members
    want = 0.25 * knn.predict(x_test).quality + 0.75 * carrot.predict(x_test).quality
    np.testing.assert_allclose(ens.predict(x_test).quality, want)
    ens.save(tmp_path / "ens")
    back = load_router(tmp_path / "ens")
    assert back.kept == [1, 2]
    np.testing.assert_array_equal(back.route(x_test, 0.1), ens.route(x_test, 0.1))
    with pytest.raises(ValueError, match="no member can train on this table: category"):
        create("ensemble", members=[{"name": "category"}]).fit(one, x_train)


def test_router_public_methods_carry_type_hints():
    """Every public method a router defines (and its `__init__` / `_fit` hooks) annotates its arguments and result."""
    import inspect

    from moekit.llmroute.routers import base

    missing = []
    classes = [base.Router, *(get(n) for n in list_routers())]
    for cls in classes:
        for name, fn in vars(cls).items():
            if not inspect.isfunction(fn) or (name.startswith("_") and name not in ("__init__", "_fit")):
                continue
            sig = inspect.signature(fn)
            unannotated = [p.name for p in sig.parameters.values() if p.name != "self" and p.annotation is p.empty]
            if unannotated or sig.return_annotation is sig.empty:
                missing.append(f"{cls.__name__}.{name}: {unannotated or 'return'}")
    assert not missing, missing
