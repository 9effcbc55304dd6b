"""The dashboard's HTML: one page, its live panel drawn on the server (tables and SVG charts), no script library.

:func:`render_page` is the whole document; :func:`render_panel` the part the page's few lines of script fetch
from ``/panel`` every ``refresh_s`` seconds and swap in, so the page is live without any JavaScript
framework and renders the same with scripts off (then it reloads itself). Input is the snapshot of
:meth:`peer.app.dashboard.Dashboard.snapshot` (the same object ``/api/swarm`` serves).
"""
from __future__ import annotations

import datetime
import html
import math

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]

STYLE = """
body{font:14px system-ui,sans-serif;margin:16px;color:#222;background:#fafafa}
h1{font-size:20px;margin:0 0 4px} h2{font-size:16px;margin:18px 0 6px}
table{border-collapse:collapse;background:#fff} td,th{border:1px solid #ddd;padding:3px 7px;text-align:left}
th{background:#f0f0f0} .num{text-align:right;font-variant-numeric:tabular-nums}
.summary span{display:inline-block;margin-right:18px} .ok{color:#2a7a2a} .bad{color:#b22222}
td.expert{width:92px;height:44px;font-size:11px;vertical-align:top} td.expert.none{background:#f6d5d5}
.grid{display:inline-block;margin-right:16px;vertical-align:top} svg{background:#fff;border:1px solid #ddd}
.muted{color:#777}
"""

SCRIPT = """
setInterval(async () => {
  try { const r = await fetch('/panel'); if (r.ok) document.getElementById('panel').innerHTML = await r.text(); }
  catch (e) {}
}, %d);
"""


def short(peer_id: str | None) -> str:
    """The last 8 characters of a peer ID, as logs print it."""
    return "?" if not peer_id else f"…{peer_id[-8:]}"


def _e(x) -> str:
    return html.escape(str(x))


def _fmt(x, digits: int = 3, unit: str = "") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:.{digits}f}{unit}" if isinstance(x, float) else f"{x}{unit}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def _bytes(n: float | None) -> str:
    if n is None:
        return "–"
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


def _table(cls: str, header: list[str], rows: list[str], empty: str) -> str:
    if not rows:
        return f'<p class="muted {cls}-empty">{_e(empty)}</p>'
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    return f'<table class="{cls}"><tr>{head}</tr>{"".join(rows)}</table>'


def line_chart(chart_id: str, series: dict[str, list[list[float]]], *, y_label: str, width: int = 520,
               height: int = 220) -> str:
    """An SVG line chart: one polyline (with a circle per point) per named series of ``[t, y]`` points.

    The x axis is wall-clock time (unix seconds, labelled as UTC times), the y axis spans the data. Each
    polyline carries ``data-points`` (its number of points), which the browser test reads."""
    points = [(t, y) for pts in series.values() for t, y in pts if y is not None and math.isfinite(y)]
    pad_l, pad_b, pad_t, pad_r = 48, 24, 10, 10
    out = [f'<svg id="{chart_id}" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
           f'data-points="{len(points)}">']
    if not points:
        out.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" fill="#777">no {_e(y_label)} '
                   f'yet</text></svg>')
        return "".join(out)
    t0, t1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
    if t1 - t0 < 1e-9:
        t0, t1 = t0 - 1, t1 + 1
    if y1 - y0 < 1e-9:
        y0, y1 = y0 - 0.5, y1 + 0.5
    sx = lambda t: pad_l + (t - t0) / (t1 - t0) * (width - pad_l - pad_r)  # noqa: E731
    sy = lambda y: pad_t + (y1 - y) / (y1 - y0) * (height - pad_t - pad_b)  # noqa: E731
    clock = lambda t: datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%H:%M:%S")  # noqa: E731
    out.append(f'<line x1="{pad_l}" y1="{height - pad_b}" x2="{width - pad_r}" y2="{height - pad_b}" stroke="#999"/>'
               f'<line x1="{pad_l}" y1="{pad_t}" x2="{pad_l}" y2="{height - pad_b}" stroke="#999"/>'
               f'<text x="4" y="{pad_t + 10}" font-size="11">{y1:.3g}</text>'
               f'<text x="4" y="{height - pad_b}" font-size="11">{y0:.3g}</text>'
               f'<text x="{pad_l}" y="{height - 6}" font-size="11">{clock(t0)}</text>'
               f'<text x="{width - pad_r}" y="{height - 6}" font-size="11" text-anchor="end">{clock(t1)} UTC</text>'
               f'<text x="{width / 2}" y="{height - 6}" font-size="11" text-anchor="middle">{_e(y_label)}</text>')
    for i, (name, pts) in enumerate(sorted(series.items())):
        pts = [(t, y) for t, y in pts if y is not None and math.isfinite(y)]
        color = COLORS[i % len(COLORS)]
        coords = " ".join(f"{sx(t):.1f},{sy(y):.1f}" for t, y in pts)
        out.append(f'<polyline class="series" data-name="{_e(name)}" data-points="{len(pts)}" points="{coords}" '
                   f'fill="none" stroke="{color}" stroke-width="1.5"/>')
        out += [f'<circle cx="{sx(t):.1f}" cy="{sy(y):.1f}" r="2" fill="{color}"/>' for t, y in pts]
        out.append(f'<text x="{width - pad_r - 4}" y="{pad_t + 12 + 13 * i}" font-size="11" text-anchor="end" '
                   f'fill="{color}">{_e(name)}</text>')
    out.append("</svg>")
    return "".join(out)


def _peers(snapshot: dict) -> str:
    rows = [f'<tr class="peer" data-peer="{_e(p["peer_id"])}"><td title="{_e(p["peer_id"])}">{_e(short(p["peer_id"]))}'
            f'{" (this peer)" if p["peer_id"] == snapshot.get("me") else ""}</td>'
            f'<td>{_e(", ".join(p.get("roles") or []) or "DHT only")}</td><td>{_e(p.get("reachability") or "?")}</td>'
            f'<td>{_e(p.get("software") or "?")}</td><td>{_e(p.get("version") or "?")}</td>'
            f'<td class="num">{_duration(p.get("uptime_s"))}</td><td>{len(p.get("addrs") or [])}</td></tr>'
            for p in snapshot["peers"]]
    return _table("peers", ["peer", "role", "reachability", "version", "DHT protocol", "uptime", "addresses"], rows,
                  "no peers found yet")


def _experts(snapshot: dict) -> str:
    grids = []
    for layer in snapshot["experts"]["layers"]:
        rows = []
        for line in layer["grid"]:
            cells = []
            for cell in line:
                hosts = cell["hosts"]
                title = f'{cell["uid"]} on {", ".join(hosts) or "nobody"}'
                cells.append(f'<td class="expert{"" if hosts else " none"}" data-uid="{_e(cell["uid"])}" '
                             f'data-hosts="{len(hosts)}" title="{_e(title)}"><b>{_e(cell["uid"])}</b><br>'
                             f'{_e(", ".join(short(h) for h in hosts) or "unhosted")}<br>'
                             f'{_fmt(cell.get("rows"))} rows · {_fmt(cell.get("latency_ms"), 1, " ms")}'
                             f'{" · <span class=bad>" + str(cell["failures"]) + " failed</span>" if cell.get("failures") else ""}'
                             f'</td>')
            rows.append(f"<tr>{''.join(cells)}</tr>")
        grids.append(f'<div class="grid"><div>layer {_e(layer["root"])}</div><table class="experts">{"".join(rows)}'
                     f'</table></div>')
    e = snapshot["experts"]
    return (f'<p>{e["hosted"]} of {e["model_experts"]} experts hosted by {len(e["hosts"])} host{"" if len(e["hosts"]) == 1 else "s"}; rows served '
            f'(host count) and client-measured latency and failures per cell.</p>' + "".join(grids))


def _training(snapshot: dict) -> str:
    t = snapshot["training"]
    rows = [f'<tr class="trainer"><td>{_e(short(r["peer_id"]))}</td><td class="num">{r["step"]}</td>'
            f'<td class="num">{r["samples"]}</td><td class="num">{_fmt(r.get("loss"))}</td>'
            f'<td class="num">{_fmt(r.get("eval_loss"))}</td><td class="num">{_fmt(r.get("sps"), 1)}</td>'
            f'<td class="num">{_fmt(r.get("round"))}</td><td class="num">{_fmt(r.get("peers"))}</td>'
            f'<td class="num">{_fmt(r.get("rounds_ok"))} / {_fmt(r.get("rounds_failed"))}</td>'
            f'<td class="num">{_bytes(r.get("bytes_sent"))}</td><td class="num">{_fmt(r.get("age_s"), 0, " s")}</td></tr>'
            for r in t["trainers"]]
    table = _table("trainers", ["trainer", "step", "samples", "loss", "eval loss", "samples/s", "outer step", "peers",
                                "rounds ok / failed", "sent", "record age"], rows, "no trainer has published progress yet")
    return (f'<div class="summary"><span>global samples <b id="global-samples">{t["global_samples"]}</b></span>'
            f'<span>outer step <b>{_fmt(t["outer_step"])}</b></span>'
            f'<span>swarm samples/s <b>{_fmt(t["samples_per_s"], 1)}</b></span></div>'
            + line_chart("loss-chart", t["loss_series"], y_label="training loss")
            + " " + line_chart("throughput-chart", {"swarm": t["throughput"]}, y_label="samples/s") + table)


def _rounds(snapshot: dict) -> str:
    r = snapshot["rounds"]
    rows = [f'<tr class="round {"ok" if x["ok"] else "bad"}"><td>{_e(short(x["peer_id"]))}</td>'
            f'<td>{datetime.datetime.fromtimestamp(x["t"], datetime.timezone.utc).strftime("%H:%M:%S")}</td>'
            f'<td>{"ok" if x["ok"] else "failed"}</td><td class="num">{x["group"]}</td>'
            f'<td class="num">{x["contributors"]}</td><td class="num">{x["s"]:.2f} s</td>'
            f'<td class="num">{_bytes(x["sent"])}</td><td class="muted">{_e(x.get("reason") or "")}</td></tr>'
            for x in r["recent"]]
    return (f'<div class="summary"><span>rounds seen <b>{r["total"]}</b></span><span class="ok">ok {r["ok"]}</span>'
            f'<span class="bad">failed {r["failed"]}</span><span>median duration {_fmt(r["median_s"], 2, " s")}</span>'
            f'<span>mean group {_fmt(r["mean_group"], 1)}</span></div>'
            + _table("rounds", ["trainer", "ended (UTC)", "outcome", "group", "contributors", "duration", "sent", "reason"],
                     rows, "no averaging round yet"))


def _leaderboard(snapshot: dict) -> str:
    board = snapshot["contributions"]
    trainers = [f'<tr class="contributor"><td>{i + 1}</td><td>{_e(short(r["peer_id"]))}</td>'
                f'<td class="num">{_fmt(r["confirmed"], 0)}</td><td class="num">{_fmt(r["averaged"], 0)}</td>'
                f'<td class="num">{r["samples"]}</td><td class="num">{r["rounds"]}</td>'
                f'<td class="num {"bad" if r["mismatches"] else ""}">{r["mismatches"]}</td></tr>'
                for i, r in enumerate(board["trainers"])]
    hosts = [f'<tr class="host"><td>{i + 1}</td><td>{_e(short(r["peer_id"]))}</td><td class="num">{r["rows"]}</td>'
             f'<td class="num">{r["confirmed_rows"]}</td></tr>' for i, r in enumerate(board["hosts"])]
    bad = [f'<li class="bad">{_e(short(m["peer_id"]))} claims {m["claimed"]:.1f} samples in rounds with '
           f'{_e(short(m["partner"]))}, which saw {m["seen"]:.1f}</li>' for m in board["mismatches"]]
    return (_table("leaderboard", ["#", "trainer", "confirmed samples", "averaged (claimed)", "processed", "rounds",
                                   "mismatches"], trainers, "no contributions recorded yet")
            + "<p></p>" + _table("host-leaderboard", ["#", "expert host", "rows served (claimed)",
                                                     "rows confirmed by trainers"], hosts, "no expert host yet")
            + (f"<ul>{''.join(bad)}</ul>" if bad else '<p class="muted">No claim exceeds what partners saw.</p>'))


def render_panel(snapshot: dict) -> str:
    """The live part of the page (everything under the title)."""
    when = datetime.datetime.fromtimestamp(snapshot["t"], datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    return (f'<p class="muted">swarm <b>{_e(snapshot["swarm"])}</b> · {_e(snapshot["prefix"])} · seen from '
            f'{_e(short(snapshot["me"]))} · {when}{" · " + _e(snapshot["error"]) if snapshot.get("error") else ""}</p>'
            f'<h2>Peers ({len(snapshot["peers"])})</h2>{_peers(snapshot)}'
            f'<h2>Experts</h2>{_experts(snapshot)}'
            f'<h2>Training</h2>{_training(snapshot)}'
            f'<h2>Averaging rounds</h2>{_rounds(snapshot)}'
            f'<h2>Contributions</h2>{_leaderboard(snapshot)}'
            f'<p class="muted">Privacy budget: not tracked (this swarm trains without differential privacy).</p>')


def render_page(snapshot: dict, refresh_s: float = 2.0) -> str:
    """The whole dashboard document."""
    return (f'<!doctype html><html><head><meta charset="utf-8"><title>swarmtrain · {_e(snapshot["swarm"])}</title>'
            f'<noscript><meta http-equiv="refresh" content="{max(1, round(refresh_s))}"></noscript>'
            f'<style>{STYLE}</style></head><body><h1>swarmtrain dashboard</h1>'
            f'<div id="panel">{render_panel(snapshot)}</div>'
            f'<p class="muted">JSON for scripts: <a href="/api/">/api/</a></p>'
            f'<script>{SCRIPT % int(refresh_s * 1000)}</script></body></html>')
