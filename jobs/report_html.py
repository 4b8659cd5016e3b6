"""One self-contained HTML page from a run's ``summary.json`` (``jobs.run_report``): inline CSS,
plots drawn with matplotlib and embedded as PNG data URIs, no script and no network reference,
so the file opens anywhere (a laptop, an MLflow artifact view, an air-gapped cluster).

Every number of the ablation tables is a ``<td>`` whose ``data-key`` names where it comes from in
the summary (``test|<arm>|<slice>|<metric>`` or ``pair|<a>|<b>|<slice>|<metric>|<field>``), so a
test can check the page against ``summary.json``.
"""

from __future__ import annotations

import base64
import html
import io
from typing import Optional

SLICES = ("all", "cold", "known_users", "new_users")

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:2em auto;max-width:1180px;
color:#1d1d1f;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.6em 0;font-size:.88em}
th,td{padding:.25em .6em;border-bottom:1px solid #eee;text-align:right;white-space:nowrap}
th:first-child,td:first-child,td.t,th.t{text-align:left}
td.w{white-space:normal;word-break:break-word;text-align:left;max-width:720px}
th{background:#f5f5f7}.muted{color:#777}.bad{color:#b00020}.good{color:#1b7f3b}
img{max-width:100%;border:1px solid #eee;margin:.4em 0}
"""


def _e(v) -> str:
    return html.escape(str(v))


def _num(v, spec: str = ".4f") -> str:
    return "–" if v is None else format(v, spec)


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _img(uri: str, alt: str) -> str:
    return f'<img src="{uri}" alt="{_e(alt)}">'


def _figure(cols: int = 1, width: float = 5.6, height: float = 3.4):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, cols, figsize=(width * cols, height), squeeze=False)
    return fig, axes[0]


# ---------------------------------------------------------------------------- sections
def ablation_section(a: Optional[dict]) -> str:
    if not a:
        return "<p class=muted>No ablation: the evaluate stage has not run for this ds.</p>"
    rows = {(r["arm"], r["slice"]): r for r in a["test"]}
    pct = int(round(a["level"] * 100))
    head = ("<tr><th>arm</th><th>slice</th><th>n</th><th>AUC</th><th>interval</th><th>GAUC</th>"
            "<th>LogLoss</th><th>NE</th><th>calibrated NE</th><th>NE vs train rate</th></tr>")
    body = []
    for arm in a["arms"]:
        for sl in SLICES:
            r = rows.get((arm, sl))
            if r is None:
                continue

            def cell(metric, spec=".4f", r=r, arm=arm, sl=sl):
                return (f'<td data-key="test|{_e(arm)}|{sl}|{metric}">'
                        f'{_num(r.get(metric), spec)}</td>')

            interval = (f'[{_num(r.get("auc_lo"))}, {_num(r.get("auc_hi"))}]'
                        if r.get("auc_lo") is not None else "–")
            body.append(f"<tr><td class=t>{_e(arm)}</td><td class=t>{sl}</td>"
                        f"<td>{_e(r['n'])}</td>{cell('auc')}<td>{interval}</td>{cell('gauc')}"
                        f"{cell('logloss')}{cell('ne')}{cell('cal_ne')}{cell('ne_train')}</tr>")
    out = [f"<p>Test part, metrics averaged over the seeds, {pct}% bootstrap intervals over "
           f"users ({a['bootstrap']} resamples).</p>",
           f'<table id="ablation">{head}{"".join(body)}</table>']
    if a["pairs"]:
        prow = []
        for p in a["pairs"]:
            key = f"pair|{_e(p['a'])}|{_e(p['b'])}|{p['slice']}|{p['metric']}"
            cls = "good" if p["lo"] > 0 else "bad" if p["hi"] < 0 else ""
            prow.append(f"<tr><td class=t>{_e(p['a'])} − {_e(p['b'])}</td>"
                        f"<td class=t>{p['slice']}</td><td class=t>{p['metric']}</td>"
                        f'<td class="{cls}" data-key="{key}|diff">{_num(p["diff"], "+.4f")}</td>'
                        f'<td data-key="{key}|lo">{_num(p["lo"], "+.4f")}</td>'
                        f'<td data-key="{key}|hi">{_num(p["hi"], "+.4f")}</td></tr>')
        out.append(f"<p>Paired differences (the same resampled users for both arms), {pct}% "
                   "interval; green: above 0, red: below 0.</p>"
                   '<table id="pairs"><tr><th>difference</th><th>slice</th><th>metric</th>'
                   f"<th>diff</th><th>low</th><th>high</th></tr>{''.join(prow)}</table>")
    return "\n".join(out)


def training_section(t: dict) -> str:
    if not t:
        return "<p class=muted>No training curves: the train stage has not run.</p>"
    fig, (ax1, ax2) = _figure(2)
    for arm, c in t.items():
        if c["loss"]:
            xs, ys = zip(*c["loss"])
            ax1.plot(xs, ys, label=arm, lw=1)
        if c["valid"]:
            xs, ys = zip(*c["valid"])
            ax2.plot(xs, ys, marker=".", label=arm, lw=1)
    ax1.set(title="training loss (mean over ranks)", xlabel="step", ylabel="loss")
    metric = next((c["valid_metric"] for c in t.values() if c.get("valid_metric")), "metric")
    ax2.set(title=f"validation {metric}", xlabel="step", ylabel=metric)
    for ax in (ax1, ax2):
        ax.grid(alpha=.3)
        ax.legend(fontsize=7)
    rows = "".join(f"<tr><td class=t>{_e(arm)}</td><td>{c['steps']}</td>"
                   f"<td>{_e(c.get('best_step'))}</td><td>{_e(c.get('world'))}</td></tr>"
                   for arm, c in t.items())
    return (_img(_png(fig), "training and validation curves per arm") +
            "<table><tr><th>arm</th><th>steps</th><th>best step</th><th>ranks</th></tr>"
            f"{rows}</table>")


def codebook_section(books: list[dict]) -> str:
    if not books:
        return "<p class=muted>No codebook: the quantize stage has not run.</p>"
    out = []
    for b in books:
        fig, (ax1, ax2) = _figure(2, 4.2, 2.8)
        lv = [x for x in b["levels"] if x["utilization"] is not None]
        ax1.bar([f"level {x['level']}" for x in lv], [x["utilization"] for x in lv])
        ax1.set(title="code utilization", ylim=(0, 1.05))
        px = [x for x in b["prefixes"] if x["collision_rate"] is not None]
        ax2.bar([f"prefix {x['prefix']}" for x in px], [x["collision_rate"] for x in px],
                color="#c0504d")
        ax2.set(title="collision rate (items sharing the prefix)", ylim=(0, 1.05))
        out.append(f"<h3>{_e(b['stage'])}: {_e(b['table'])}</h3>"
                   + _img(_png(fig), f"utilization and collisions of {b['table']}"))
    return "\n".join(out)


def retrieval_section(r: Optional[dict]) -> str:
    if not r:
        return "<p class=muted>No retrieval stage ran in this run.</p>"
    fig, (ax,) = _figure(1)
    for name, pts in r.items():
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o", label=name)
    ax.set(title="recall@K", xlabel="K", ylabel="recall", xscale="log")
    ax.grid(alpha=.3)
    ax.legend(fontsize=7)
    return _img(_png(fig), "retrieval recall at K")


def stages_section(stages: list[dict]) -> str:
    def counts(d: dict) -> str:
        return "<br>".join(f"{_e(t)}: {_num(n, ',d') if n is not None else '?'}"
                           for t, n in d.items()) or "–"

    rows = "".join(
        f"<tr><td class=t>{_e(s['stage'])}</td><td class=t>{_e(s['status'])}</td>"
        f"<td>{_num(s['seconds'], '.1f')}</td><td class=t>{counts(s['inputs'])}</td>"
        f"<td class=t>{counts(s['outputs'])}</td><td class=t>{counts(s['quarantined'])}</td>"
        "</tr>" for s in stages)
    timed = [s for s in stages if s["seconds"] is not None]
    img = ""
    if timed:
        fig, (ax,) = _figure(1, 7, 0.3 * len(timed) + 1)
        ax.barh([s["stage"] for s in timed][::-1], [s["seconds"] for s in timed][::-1])
        ax.set(title="stage wall time (s)", xlabel="seconds")
        img = _img(_png(fig), "stage timings")
    return (img + '<table id="stages"><tr><th>stage</th><th class=t>status</th><th>seconds</th>'
            "<th class=t>rows in</th><th class=t>rows out</th><th class=t>quarantined</th></tr>"
            + rows + "</table>")


def registered_section(reg: list[dict]) -> str:
    if not reg:
        return "<p class=muted>No model version registered by this run (or MLflow off).</p>"
    rows = "".join(
        f"<tr><td class=t>{_e(v['model'])}</td><td>{_e(v['version'])}</td>"
        f"<td class=t>{_e(', '.join(v.get('aliases') or []))}</td>"
        f"<td class=t>{_e(v['stage'])}</td><td class=w>"
        + ", ".join(f"{_e(k)}={_e(x)}" for k, x in sorted(v["tags"].items())) + "</td></tr>"
        for v in reg)
    return ("<table><tr><th>model</th><th>version</th><th class=t>aliases</th>"
            f"<th class=t>stage</th><th class=t>tags</th></tr>{rows}</table>")


def render(s: dict) -> str:
    title = f"qarm run {s['run']}"
    parts = [
        f"<h1>{_e(title)}</h1><p class=muted>ds {_e(s['ds'])} · source {_e(s['source'])} · "
        f"created {_e(s['created_at'])} · root {_e(s['root'])}</p>",
        "<h2>Ablation</h2>", ablation_section(s.get("ablation")),
        "<h2>Training and validation curves</h2>", training_section(s.get("training") or {}),
        "<h2>Codebooks</h2>", codebook_section(s.get("codebooks") or []),
        "<h2>Retrieval</h2>", retrieval_section(s.get("retrieval")),
        "<h2>Stages: timings and row counts</h2>", stages_section(s.get("stages") or []),
        "<h2>Registered model versions</h2>", registered_section(s.get("registered") or []),
    ]
    return (f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>{_e(title)}</title>"
            f"<style>{CSS}</style></head><body>" + "\n".join(parts) + "</body></html>\n")
