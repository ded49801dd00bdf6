"""The playground page at / in a real headless Chromium (tests/browser.py), against the session's real app
(tests/conftest.py): generate with a picked class and model, see the images and the chosen model; diffusion's
previews painted as they stream in, before the final image; errors before and during a stream shown; on the
second tab, interpolate, and score an uploaded PNG and the generated images; no console errors."""
from __future__ import annotations

import base64
import json
import re
import urllib.error
import urllib.request

import pytest

from families.data import load_split
from serving.api.png import encode_png
from tests.browser import open_page
from tests.test_openai_api import decode_png

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*")
TIMEOUT_MS = 60_000  # generous: Ray on a shared 2-core machine
PNG_URL = "data:image/png;base64,"
# Records, in order, each image put into #images ({kind, src, caption}) and, for each, a "<kind> shown" entry
# once a frame was rendered with it on the page (two animation frames later, still there): a preview that
# was inserted and replaced before any paint does not count as seen.
RECORD_PAINTS = """() => {
  window.painted = [];
  new MutationObserver((records) => {
    for (const node of records.flatMap((r) => [...r.addedNodes])) {
      if (node.tagName !== "IMG") continue;
      const caption = node.parentElement.querySelector("figcaption");
      window.painted.push({kind: node.dataset.kind, src: node.src, caption: caption ? caption.textContent : null});
      requestAnimationFrame(() => requestAnimationFrame(() => {
        if (node.isConnected) window.painted.push({kind: node.dataset.kind + " shown"});
      }));
    }
  }).observe(document.querySelector("#images"), {childList: true, subtree: true});
}"""


def fetch(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            return r.status, r.headers["content-type"], r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers["content-type"], err.read()


def test_the_page_and_its_files_are_served(server):
    status, kind, body = fetch(server["url"] + "/")
    assert (status, kind.split(";")[0]) == (200, "text/html") and b"/playground/app.js" in body
    for name, media in (("app.js", "text/javascript"), ("style.css", "text/css")):
        status, kind, _ = fetch(f"{server['url']}/playground/{name}")
        assert (status, kind.split(";")[0]) == (200, media)
    status, _, body = fetch(server["url"] + "/playground/..%2Fhttp.py")
    assert status == 404 and json.loads(body)["error"]["code"] == "not_found"


def post_json(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def server_sent(text: str) -> list[dict]:
    """The data of each server-sent event in a whole stream's text."""
    return [json.loads(line.removeprefix("data: ")) for frame in text.split("\n\n")
            for line in frame.splitlines() if line.startswith("data: ")]


def fill_generate_form(page, *, model: str, class_label: str, n: int, steps: int, slo_ms: int, seed: int,
                       best_effort: bool) -> None:
    page.wait_for_selector("body[data-ready=true]", timeout=TIMEOUT_MS)
    page.select_option("#class", label=class_label)
    page.select_option("#model", model)
    page.fill("#n", str(n))
    page.fill("#steps", str(steps))
    page.fill("#slo", str(slo_ms))
    page.fill("#seed", str(seed))
    page.set_checked("#best-effort", best_effort)
    assert page.is_checked("#previews")  # on by default


def test_diffusion_previews_are_painted_before_the_final_image(server):
    with open_page(server["url"] + "/") as loaded:
        page = loaded.page
        # enough steps that the previews (at about steps 10, 20, 30) come well before the end
        fill_generate_form(page, model="diffusion", class_label="Bag", n=1, steps=40, slo_ms=60_000, seed=11,
                           best_effort=True)
        page.evaluate(RECORD_PAINTS)
        page.click("#generate-button")
        page.wait_for_function("(() => { const i = document.querySelector('#images img[data-kind=final]');"
                               " return i && i.complete && i.naturalWidth === 28; })()", timeout=TIMEOUT_MS)
        page.wait_for_function("!document.querySelector('#generate-button').disabled", timeout=TIMEOUT_MS)
        painted = page.evaluate("window.painted")

        inserted = [p for p in painted if "src" in p]
        assert [p["kind"] for p in inserted] == ["preview"] * 3 + ["final"]
        kinds = [p["kind"] for p in painted]
        assert "preview shown" in kinds[:kinds.index("final")]  # a preview was on screen before the final came
        steps = [re.fullmatch(r"preview (\d)/3 · step (\d+)/40", p["caption"]) for p in inserted[:3]]
        assert all(steps) and [int(m[1]) for m in steps] == [1, 2, 3]
        assert 0 < int(steps[0][2]) < int(steps[1][2]) < int(steps[2][2]) < 40
        final = inserted[-1]
        assert final["caption"] is None and final["src"].startswith(PNG_URL)
        shown = decode_png(base64.b64decode(final["src"].removeprefix(PNG_URL)))
        assert shown.shape == (28, 28)
        assert all(p["src"] != final["src"] for p in inserted[:3])  # previews are the image in progress

        # the final is the image the same request makes unstreamed, and what made it is shown as before
        status, unstreamed = post_json(server["url"] + "/v1/images/generations", {
            "model": "diffusion", "class_id": 8, "seed": 11, "steps": 40, "latency_slo_ms": 60_000,
            "best_effort": True})
        assert status == 200
        assert (decode_png(base64.b64decode(unstreamed["data"][0]["b64_json"])) == shown).all()
        assert page.get_attribute("#images img", "alt") == "Bag 1"
        assert page.inner_text("#chosen-model strong") == "diffusion"
        assert json.loads(page.inner_text("#settings")) == unstreamed["settings"]
        assert unstreamed["settings"]["steps"] == 40
        assert "ms at the server" in page.inner_text("#latency")
        assert page.is_hidden("#generate-error")
        assert loaded.problems == []


def test_a_refused_generation_shows_the_servers_error(server):
    with open_page(server["url"] + "/") as loaded:
        page = loaded.page
        # 500 steps in 5 ms: no model can; without best effort the policy refuses before any event
        fill_generate_form(page, model="diffusion", class_label="Shirt", n=1, steps=500, slo_ms=5, seed=1,
                           best_effort=False)
        with page.expect_response("**/v1/images/generations", timeout=TIMEOUT_MS) as response:
            page.click("#generate-button")
        assert response.value.status == 429
        page.wait_for_selector("#generate-error", state="visible", timeout=TIMEOUT_MS)
        assert page.inner_text("#generate-error") == response.value.json()["error"]["message"]
        assert page.locator("#images img").count() == 0
        assert page.is_enabled("#generate-button")
        # the browser's own "Failed to load resource: ... 429" line is the refusal itself, not a page error
        assert [p for p in loaded.problems if "status of 429" not in p] == []


def test_an_error_event_during_the_stream_is_shown_after_the_previews(server):
    """The real server's `error` event after the stream began: 1000 guided steps (~3.6 s alone here) best effort
    under a 2 s SLO: the first preview comes at step 250 (~0.9 s), then the deadline passes mid-sampling and
    the stream ends with a 504's error event."""
    with open_page(server["url"] + "/") as loaded:
        page = loaded.page
        fill_generate_form(page, model="diffusion", class_label="Coat", n=1, steps=1000, slo_ms=2000, seed=1,
                           best_effort=True)
        page.click("#generate-button")
        page.wait_for_selector("#generate-error", state="visible", timeout=TIMEOUT_MS)
        # the ingress's deadline (or the engine's, if its clock fires first): a 504 either way
        assert re.fullmatch(r"diffusion did not answer within 2000 ms|.*missed its deadline.*",
                            page.inner_text("#generate-error"))
        assert page.get_attribute("#images img", "data-kind") == "preview"
        assert page.inner_text("#images figcaption").startswith("preview ")
        assert page.is_enabled("#generate-button")
        assert loaded.problems == []


def test_generate_then_interpolate_and_score_in_a_browser(server, tmp_path):
    uploaded = load_split("test").images[0]
    (tmp_path / "upload.png").write_bytes(encode_png(uploaded))
    with open_page(server["url"] + "/") as loaded:
        page = loaded.page
        page.wait_for_selector("body[data-ready=true]", timeout=TIMEOUT_MS)

        # Generate: pick a class and a model, see the images and which model made them
        page.select_option("#class", label="Sneaker")
        page.select_option("#model", "gan")
        page.fill("#n", "3")
        page.fill("#slo", "30000")
        page.click("#generate-button")
        page.wait_for_function("[...document.querySelectorAll('#images img')]"
                               ".filter(i => i.complete && i.naturalWidth === 28).length === 3", timeout=TIMEOUT_MS)
        assert page.inner_text("#chosen-model strong") == "gan"
        assert "ms at the server" in page.inner_text("#latency")
        assert page.get_attribute("#images img", "alt") == "Sneaker 1"

        page.select_option("#model", "auto")  # the server (the policy, when it is there) chooses
        with page.expect_response("**/v1/images/generations", timeout=TIMEOUT_MS) as response:
            page.click("#generate-button")
        completed = [e for e in server_sent(response.value.text()) if e["type"] == "image_generation.completed"]
        page.wait_for_function("!document.querySelector('#generate-button').disabled", timeout=TIMEOUT_MS)
        assert len(completed) == 3 and page.inner_text("#chosen-model strong") == completed[0]["model"]
        assert page.inner_text("#policy") != "model named in the request"
        assert page.is_hidden("#generate-error")

        # Second tab: interpolation between two seeds
        page.click("#tab-operations")
        assert page.is_visible("#operations") and page.is_hidden("#generate")
        page.fill("#frames", "5")
        page.click("#interpolate-button")
        page.wait_for_function("[...document.querySelectorAll('#interpolation img')].filter(i => i.naturalWidth === 28)"
                               ".length === 5", timeout=TIMEOUT_MS)
        assert "slerp" in page.inner_text("#interpolate-info")

        # Likelihood of an uploaded test image: the same bits/dim the API gives for those exact pixels
        page.set_input_files("#upload", str(tmp_path / "upload.png"))
        page.wait_for_function("document.querySelectorAll('#scores tbody tr').length === 1", timeout=TIMEOUT_MS)
        page.select_option("#score-model", "pixelcnn")
        page.click("#score-button")
        page.wait_for_function("document.querySelector('#scores tbody tr td:nth-child(3)').textContent !== '—'",
                               timeout=TIMEOUT_MS)
        shown = float(page.inner_text("#scores tbody tr td:nth-child(3)"))
        body = json.dumps({"model": "pixelcnn", "images": [base64.b64encode(encode_png(uploaded)).decode()]}).encode()
        req = urllib.request.Request(server["url"] + "/v1/likelihood", data=body, method="POST",
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            expected = json.loads(r.read())["data"][0]["bits_per_dim"]
        assert shown == pytest.approx(expected, abs=1e-3)

        # ...and of the generated images, and a reconstruction by the VAE
        page.click("#use-generated")
        page.wait_for_function("document.querySelectorAll('#scores tbody tr').length === 4", timeout=TIMEOUT_MS)
        page.select_option("#score-model", "vae")
        page.click("#score-button")
        page.wait_for_function("document.querySelectorAll('#scores tbody tr td:nth-child(5) img').length === 4",
                               timeout=TIMEOUT_MS)
        assert all(float(t) >= 0 for t in page.locator("#scores tbody tr td:nth-child(4)").all_inner_texts())
        assert page.is_hidden("#score-error")
        assert loaded.problems == []
