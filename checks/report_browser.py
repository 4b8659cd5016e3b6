"""Open a run report in a real headless browser (Debian's ``chromium``) and check it.

Drives Chromium over the DevTools protocol (aiohttp's websocket client): enables the console,
log and network domains, loads the report from ``file://`` with every host name unresolvable,
and fails when the page logged a console error or an uncaught exception, requested anything but
``file:``/``data:`` URLs, or does not show the ablation table. It saves a full-page screenshot
next to the report. ``--self-test`` then runs the same check on two broken copies of the page (a
console error, a network image) and requires both to fail, so the check is known to be able to
fail.

    python checks/report_browser.py                      # newest report under .qarm/reports
    python checks/report_browser.py --report PATH.html --self-test
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CHROMIUM = ("chromium", "chromium-browser", "google-chrome")


class PageProblem(AssertionError):
    """The page failed the browser check."""


def find_browser() -> str:
    for name in CHROMIUM:
        if shutil.which(name):
            return shutil.which(name)
    raise SystemExit("no chromium on PATH: `make report-check` installs Debian's chromium")


async def _check(url: str, screenshot: Path | None, timeout: float = 60) -> dict:
    import aiohttp

    profile = tempfile.mkdtemp(prefix="qarm-chromium-")
    proc = subprocess.Popen(
        [find_browser(), "--headless=new", "--no-sandbox", "--disable-gpu",
         "--remote-debugging-port=0", f"--user-data-dir={profile}", "--window-size=1280,1000",
         "--host-resolver-rules=MAP * ~NOTFOUND", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        port = None
        for line in proc.stderr:                       # "DevTools listening on ws://..."
            m = re.search(r"DevTools listening on ws://[\d.]+:(\d+)/", line)
            if m:
                port = int(m.group(1))
                break
        if port is None:
            raise RuntimeError("chromium did not start its DevTools endpoint")
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/json/list") as r:
                page = next(t for t in await r.json() if t["type"] == "page")
            async with http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                return await _drive(ws, url, screenshot, timeout)
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(profile, ignore_errors=True)


async def _drive(ws, url: str, screenshot: Path | None, timeout: float) -> dict:
    ids = iter(range(1, 10 ** 6))
    pending: dict[int, asyncio.Future] = {}
    problems: list[str] = []
    requests: list[str] = []
    loaded = asyncio.get_running_loop().create_future()

    async def reader():
        async for msg in ws:
            m = json.loads(msg.data)
            if "id" in m and m["id"] in pending:
                pending.pop(m["id"]).set_result(m)
                continue
            method, p = m.get("method"), m.get("params", {})
            if method == "Runtime.consoleAPICalled" and p["type"] in ("error", "assert"):
                problems.append("console error: " + " ".join(
                    str(a.get("value", a.get("description"))) for a in p["args"]))
            elif method == "Runtime.exceptionThrown":
                problems.append("uncaught: " + p["exceptionDetails"].get("text", ""))
            elif method == "Log.entryAdded" and p["entry"]["level"] == "error":
                problems.append("log error: " + p["entry"]["text"])
            elif method == "Network.requestWillBeSent":
                requests.append(p["request"]["url"])
            elif method == "Page.loadEventFired" and not loaded.done():
                loaded.set_result(True)

    async def call(method: str, **params):
        i = next(ids)
        pending[i] = asyncio.get_running_loop().create_future()
        await ws.send_str(json.dumps({"id": i, "method": method, "params": params}))
        res = await asyncio.wait_for(pending[i], timeout)
        if "error" in res:
            raise RuntimeError(f"{method}: {res['error']}")
        return res["result"]

    task = asyncio.create_task(reader())
    try:
        for domain in ("Runtime", "Log", "Network", "Page"):
            await call(f"{domain}.enable")
        await call("Page.navigate", url=url)
        await asyncio.wait_for(loaded, timeout)
        await asyncio.sleep(0.5)                       # late console messages
        shown = await call("Runtime.evaluate", returnByValue=True, expression=(
            "(() => { const t = document.querySelector('#ablation');"
            " return t ? t.querySelectorAll('tr').length - 1 : -1; })()"))
        rows = shown["result"]["value"]
        if screenshot is not None:
            shot = await call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
            import base64

            screenshot.write_bytes(base64.b64decode(shot["data"]))
    finally:
        task.cancel()
    remote = [u for u in requests if not u.startswith(("file:", "data:"))]
    if remote:
        problems.append(f"network requests: {remote[:3]}")
    if rows <= 0:
        problems.append("the ablation table is missing or empty")
    return {"url": url, "ablation_rows": rows, "requests": len(requests), "problems": problems}


def check(report: Path, screenshot: Path | None = None) -> dict:
    """Load ``report`` in Chromium; raises :class:`PageProblem` listing what is wrong."""
    res = asyncio.run(_check(report.resolve().as_uri(), screenshot))
    if res["problems"]:
        raise PageProblem(f"{report}: " + "; ".join(res["problems"]))
    return res


def self_test(report: Path) -> None:
    """The check must fail on a copy of the report with a console error, and on one with a
    network image."""
    page = report.read_text()
    broken = {
        "console": page.replace("</body>", "<script>console.error('broken')</script></body>"),
        "network": page.replace("</body>", '<img src="https://example.com/x.png"></body>'),
    }
    with tempfile.TemporaryDirectory() as d:
        for name, html in broken.items():
            p = Path(d) / f"{name}.html"
            p.write_text(html)
            try:
                check(p)
            except PageProblem as e:
                print(f"self-test: the {name} page fails as it must ({e})")
                continue
            raise SystemExit(f"self-test: the check passed a page with a {name} problem")


def newest_report(root: Path) -> Path:
    found = sorted(root.glob("reports/*/report.html"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise SystemExit(f"no report under {root}/reports: run `make demo` first")
    return found[-1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--report", type=Path, help="report.html (default: newest under --root)")
    ap.add_argument("--root", type=Path, default=Path(".qarm"))
    ap.add_argument("--self-test", action="store_true")
    args = ap.parse_args(argv)
    report = args.report or newest_report(args.root)
    shot = report.parent / "screenshot.png"
    res = check(report, shot)
    if args.self_test:
        self_test(report)
    print(json.dumps({**res, "screenshot": str(shot)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
