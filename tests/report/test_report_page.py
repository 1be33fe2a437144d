"""framelm.report.page: the rendered page, self-contained, in a real browser."""

from __future__ import annotations

import html
import json
import shutil
import subprocess

import pytest


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

# Injected into a copy of the page: records script errors and, after load, how many images
# decoded (naturalWidth > 0), so `--dump-dom` shows what the browser saw.
PROBE_HEAD = """<script>
window.__errors = [];
window.addEventListener('error', e => window.__errors.push(String(e.message || (e.target && e.target.src) || e)), true);
const consoleError = console.error;
console.error = (...a) => { window.__errors.push(a.join(' ')); consoleError(...a); };
</script>"""

PROBE_BODY = """<script>
window.addEventListener('load', () => {
  const imgs = Array.from(document.images);
  const probe = document.createElement('pre');
  probe.id = 'probe';
  probe.textContent = JSON.stringify({images: imgs.length,
    loaded: imgs.filter(i => i.complete && i.naturalWidth > 0).length, errors: window.__errors});
  document.body.appendChild(probe);
});
</script>"""


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium); browser check skipped")
def test_page_loads_every_image_in_headless_chromium(full_report, tmp_path):
    run, _ = full_report
    copied = tmp_path / "copied-report"  # the page must work once its folder is copied elsewhere
    shutil.copytree(run.path("report"), copied)
    page = copied / "index.html"
    text = page.read_text()
    page.write_text(text.replace("<head>", "<head>\n" + PROBE_HEAD, 1).replace("</body>", PROBE_BODY + "\n</body>", 1))
    result = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage",
         f"--user-data-dir={tmp_path / 'chromium-profile'}", "--virtual-time-budget=5000", "--dump-dom",
         page.as_uri()],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    start = result.stdout.find('<pre id="probe">')
    assert start >= 0, f"the probe did not run; chromium printed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    probe = json.loads(html.unescape(result.stdout[start + len('<pre id="probe">'):result.stdout.index("</pre>", start)]))
    assert probe == {"images": 7, "loaded": 7, "errors": []}
