"""The playground page at / in a real headless Chromium (tests/browser.py), against the session's real app
(tests/conftest.py): generate with a picked class and model, see the images and the chosen model; on the
second tab, interpolate, and score an uploaded PNG and the generated images; no console errors."""
from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request

import pytest

from families.data import load_split
from serving.api.png import encode_png
from tests.browser import open_page

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*")
TIMEOUT_MS = 60_000  # generous: Ray on a shared 2-core machine


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
        page.wait_for_function("document.querySelector('#policy').textContent !== 'model named in the request'",
                               timeout=TIMEOUT_MS)
        assert page.inner_text("#chosen-model strong") == response.value.json()["model"]
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
