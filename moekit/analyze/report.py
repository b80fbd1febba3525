"""Run every metric on a trace and write metrics.json, figures and a self-contained HTML report."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from moekit.analyze import plots
from moekit.analyze.metrics.coactivation import coactivation, interlayer_affinity
from moekit.analyze.metrics.experts import behaviour_experts, super_experts
from moekit.analyze.metrics.load import expert_load
from moekit.analyze.metrics.locality import local_consistency
from moekit.analyze.metrics.specialization import preferred_tokens, specialization
from moekit.analyze.table import Trace
from moekit.utils.io import atomic_write_text


def compute_metrics(
    trace: Trace,
    *,
    label: str | None = "label",
    segment_lengths=(4, 8, 16, 32, 64),
    cache_multiples=(1, 2, 4),
    behaviour: tuple[str, str, str] | None = None,
) -> dict:
    """Every metric of docs/analysis.md for one trace. `behaviour` = (label column, set A, set B)."""
    metrics = {
        "trace": {
            "path": str(trace.path),
            "layers": trace.layers,
            "num_experts": trace.num_experts,
            "k": trace.k,
            "slots": trace.slots,
            "experts_per_token": trace.experts_per_token,
            "variable_k": trace.variable_k,
            "label_columns": trace.label_columns,
        },
        "load": expert_load(trace),
        "coactivation": coactivation(trace),
        "affinity": interlayer_affinity(trace),
        "locality": local_consistency(trace, segment_lengths, cache_multiples),
        "super_experts": super_experts(trace),
        "preferred_tokens": preferred_tokens(trace),
    }
    if label and label in trace.label_columns:
        metrics["specialization"] = specialization(trace, label)
    if behaviour:
        metrics["behaviour"] = behaviour_experts(trace, *behaviour)
    return metrics


def _num(v: float | None, fmt: str) -> str:
    """A metric cell: "n/a" where the metric does not apply (None)."""
    return "n/a" if v is None else format(v, fmt)


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" style="max-width:100%">'


def write_report(metrics: dict, out_dir: str | Path, decode=None) -> Path:
    """metrics.json, PNG figures and report.html (images inlined) in `out_dir`. `decode(token_id) -> str`
    shows preferred tokens as text."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=1, default=float))
    figs = {"load": plots.load_heatmap(metrics["load"], out / "load.png")}
    if "specialization" in metrics:
        figs["labels"] = plots.label_heatmaps(metrics["specialization"], out / "label_expert.png")
    if metrics["affinity"]:
        figs["affinity"] = plots.affinity_heatmaps(metrics["affinity"], out / "affinity.png")
    figs["locality"] = plots.locality_curves(metrics["locality"], out / "locality.png")
    t = metrics["trace"]
    esc = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>moekit routing analysis</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}</style></head><body>",
        "<h1>Routing analysis</h1>",
        f"<p>Trace <code>{esc(t['path'])}</code>: layers {t['layers']}, {t['num_experts']} experts, "
        + (
            f"a variable number of experts per token: {t['experts_per_token']:.2f} on average over "
            f"{t['slots']} slots (metrics that take k use k={t['k']}; n/a = the metric cannot tell routings "
            "apart at that size). "
            if t["variable_k"]
            else f"k={t['k']}. "
        )
        + "Definitions: docs/analysis.md. All numbers are in <code>metrics.json</code>.</p>",
        "<h2>Load</h2><table><tr><th>layer</th><th>max/mean</th><th>CV</th><th>entropy (norm.)</th>"
        "<th>empty slots</th><th>mean top-1 prob</th><th>mean router entropy</th></tr>",
    ]
    for layer, v in metrics["load"].items():
        parts.append(
            f"<tr><td>{layer}</td><td>{v['max_over_mean']:.2f}</td><td>{v['cv']:.2f}</td>"
            f"<td>{v['entropy_norm']:.3f}</td><td>{v['empty_frac']:.1%}</td>"
            f"<td>{v['mean_top1_prob']:.3f}</td><td>{v['mean_router_entropy']:.3f}</td></tr>"
        )
    parts += ["</table>", _img(figs["load"])]
    if "specialization" in metrics:
        sp = metrics["specialization"]
        parts.append(
            "<h2>Specialisation</h2><table><tr><th>layer</th><th>MI (nats)</th><th>NMI</th>"
            + "".join(f"<th>top experts: {esc(y)} (lift)</th>" for y in sp["labels"])
            + "</tr>"
        )
        for layer, v in sp["layers"].items():
            tops = "".join(
                "<td>" + ", ".join(f"{e} (x{lift:.2f})" for e, lift in v["top_experts"][y]) + "</td>"
                for y in sp["labels"]
            )
            parts.append(f"<tr><td>{layer}</td><td>{v['mi']:.4f}</td><td>{v['nmi']:.4f}</td>{tops}</tr>")
        parts += ["</table>", _img(figs["labels"])]
    if "affinity" in figs:
        parts.append(
            "<h2>Inter-layer affinity (ExFlow)</h2><table>"
            "<tr><th>layers</th><th>score</th><th>lift over independent</th></tr>"
        )
        parts += [
            f"<tr><td>{p}</td><td>{_num(v['score'], '.3f')}</td><td>{_num(v['lift'], '.2f')}</td></tr>"
            for p, v in metrics["affinity"].items()
        ]
        parts += ["</table>", _img(figs["affinity"])]
    loc = metrics["locality"]
    Ls = sorted(next(iter(loc.values()))["srp"])
    parts.append(
        "<h2>Local routing consistency (SRP, SCH)</h2><table><tr><th>layer</th>"
        + "".join(f"<th>SRP({L})</th>" for L in Ls)
        + "</tr>"
    )
    parts += [
        "<tr><td>" + str(layer) + "</td>" + "".join(f"<td>{v['srp'][L]:.3f}</td>" for L in Ls) + "</tr>"
        for layer, v in loc.items()
    ]
    parts += ["</table>", _img(figs["locality"])]
    se = metrics["super_experts"]
    parts.append("<h2>Super experts</h2>")
    if se["available"]:
        items = (
            ", ".join(
                f"layer {s['layer']} expert {s['expert']} (peak {s['peak']:.1f}, x{s['peak_over_median']:.1f} median)"
                for s in se["super_experts"]
            )
            or "none flagged"
        )
        parts.append(
            f"<p>Median expert peak {se['median_peak']:.2f}; threshold {se['threshold']:.2f}: {esc(items)}.</p>"
        )
    else:
        parts.append(f"<p>{esc(se['reason'])}</p>")
    if "behaviour" in metrics:
        b = metrics["behaviour"]
        parts.append(
            f"<h2>Behaviour-linked experts ({esc(b['a'])} vs {esc(b['b'])})</h2><table><tr><th>layer</th>"
            "<th>expert</th><th>rate A</th><th>rate B</th><th>p (Bonferroni)</th></tr>"
        )
        parts += [
            f"<tr><td>{r['layer']}</td><td>{r['expert']}</td><td>{r['rate_a']:.3f}</td><td>{r['rate_b']:.3f}</td>"
            f"<td>{r['p_bonferroni']:.2g}</td></tr>"
            for r in b["significant"]
        ]
        parts.append("</table>")
    parts.append("<h2>Tokens each expert prefers (first traced layer, by lift)</h2><table>")
    first = next(iter(metrics["preferred_tokens"].values()), {})
    for e, toks in sorted(first.items()):
        shown = ", ".join(f"{esc(repr(decode(t)) if decode else str(t))} (x{lift:.1f})" for t, lift in toks[:8])
        parts.append(f"<tr><td>expert {e}</td><td style='text-align:left'>{shown}</td></tr>")
    parts += ["</table></body></html>"]
    path = out / "report.html"
    atomic_write_text(path, "\n".join(parts))
    return path
