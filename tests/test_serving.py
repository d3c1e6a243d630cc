"""The endpoint over real HTTP: the API, batching, every bad request, and the web page."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from unittest import mock

import pytest

from spam_gpt.server import deploy, use_high_throughput_ingress
from spam_gpt.serving import MAX_TEXTS

from .conftest import CHAPTER_HAM, CHAPTER_SPAM, free_port, haproxy_running


@pytest.fixture(scope="module", params=[False, True], ids=["serve-proxy", "haproxy"])
def service(request, tiny_run):
    """The endpoint behind Serve's own proxy, then behind HAProxy (``--high-throughput``),
    each on a local Ray of its own: every test below runs against both."""
    import ray
    from ray import serve

    args = {"model": str(tiny_run / "model"), "max_batch_size": 8, "batch_wait_timeout_s": 0.05}
    with mock.patch.dict(os.environ):  # the high-throughput variables leave with this Ray
        if request.param:
            use_high_throughput_ingress(address=None)
        url = deploy(args, "127.0.0.1", free_port(), address=None)
        yield url
        serve.shutdown()
        ray.shutdown()


def test_the_ingress_is_the_one_asked_for(service, request):
    assert haproxy_running() == request.node.callspec.params["service"]


def call(url: str, path: str, body: bytes | None = None, headers: dict | None = None):
    """(status, parsed JSON or text) of one request; errors are answers, not exceptions."""
    request = urllib.request.Request(
        url + path,
        data=body,
        headers=headers or {"Content-Type": "application/json"},
        method="POST" if body is not None else "GET",
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, raw = error.code, error.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode("utf-8", "replace")


def post(url: str, path: str, payload) -> tuple[int, object]:
    return call(url, path, json.dumps(payload).encode())


def test_classify_one_message(service):
    status, body = post(service, "/classify", {"text": CHAPTER_SPAM})
    assert status == 200
    assert body["label"] == "spam" and 0.5 < body["spam_probability"] <= 1.0
    assert body["model"] == {"name": "model", "version": "local"}
    status, body = post(service, "/classify", {"text": CHAPTER_HAM})
    assert (status, body["label"]) == (200, "not spam")


def test_batch_endpoint_keeps_input_order_and_equals_single_answers(service):
    texts = [CHAPTER_HAM, CHAPTER_SPAM, "ok see u at 7", "URGENT! call 09061701461 to claim"]
    status, body = post(service, "/classify/batch", {"texts": texts})
    assert status == 200 and len(body["predictions"]) == len(texts)
    for text, batched in zip(texts, body["predictions"]):
        _, single = post(service, "/classify", {"text": text})
        assert batched["label"] == single["label"]
        assert batched["spam_probability"] == pytest.approx(single["spam_probability"], abs=1e-6)


def test_concurrent_requests_are_answered_like_single_ones(service):
    texts = [f"message {i}: {'WIN cash now' if i % 2 else 'see you later'}" for i in range(32)]
    with ThreadPoolExecutor(max_workers=32) as pool:
        answers = list(pool.map(lambda t: post(service, "/classify", {"text": t}), texts))
    _, reference = post(service, "/classify/batch", {"texts": texts})
    for (status, body), expected in zip(answers, reference["predictions"]):
        assert status == 200 and body["label"] == expected["label"]
        assert body["spam_probability"] == pytest.approx(expected["spam_probability"], abs=1e-6)


def test_overlong_text_is_truncated_not_refused(service):
    status, body = post(service, "/classify", {"text": "free prize " * 5000})
    assert status == 200 and body["label"] in ("spam", "not spam")


def test_health_model_docs_and_page(service):
    assert call(service, "/healthz") == (200, {"status": "ok"})
    status, model = call(service, "/model")
    assert status == 200 and model["reference"].endswith("model")
    assert 0.9 < model["test_accuracy"] <= 1.0 and model["config"]["token"] == "last_real"
    status, schema = call(service, "/openapi.json")
    assert status == 200 and {"/classify", "/classify/batch", "/healthz", "/model"} <= set(
        schema["paths"]
    )
    assert call(service, "/docs")[0] == 200
    status, page = call(service, "/")
    assert status == 200 and "<form" in page and "classify" in page


BAD_REQUESTS = {
    "malformed JSON": (b'{"text": "hi"', 422, "JSON"),
    "wrong type": (b'{"text": 5}', 422, "text: Input should be a valid string"),
    "missing field": (b"{}", 422, "text: Field required"),
    "unknown field": (b'{"text": "hi", "txt": "x"}', 422, "txt: Extra inputs are not permitted"),
    "null text": (b'{"text": null}', 422, "text: Input should be a valid string"),
    "empty text": (b'{"text": ""}', 422, "text is empty"),
    "blank text": (b'{"text": "   \\n "}', 422, "text is empty"),
    "not an object": (b'["hi"]', 422, "valid dictionary"),
    "invalid UTF-8": (b'{"text": "\xff\xfe bad"}', 400, ""),
    "absurd nesting": (b"[" * 200_000 + b"]" * 200_000, 400, ""),
    "body too large": (json.dumps({"text": "x" * 1_100_000}).encode(), 413, "exceeds"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_get_a_4xx_that_says_what_was_wrong(service, case):
    body, expected, message = BAD_REQUESTS[case]
    status, answer = call(service, "/classify", body)
    assert status == expected, answer
    assert message in json.dumps(answer)
    assert post(service, "/classify", {"text": CHAPTER_SPAM})[0] == 200  # still serving


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"texts": []}, "texts: List should have at least 1 item"),
        ({"texts": ["a"] * (MAX_TEXTS + 1)}, f"at most {MAX_TEXTS} items"),
        ({"texts": ["fine", ""]}, "texts [1] are empty"),
        ({"texts": ["fine", None]}, "texts.1: Input should be a valid string"),
        ({"texts": "one string"}, "texts: Input should be a valid list"),
    ],
)
def test_bad_batch_requests(service, payload, message):
    status, answer = post(service, "/classify/batch", payload)
    assert status == 422 and message in answer["error"]


def test_wrong_method_and_path_are_4xx(service):
    assert call(service, "/classify")[0] == 405
    assert call(service, "/nowhere")[0] == 404
    status, _ = call(service, "/classify", b'{"text": "hi"}', headers={"Content-Length": "x"})
    assert 400 <= status < 500


def test_the_page_classifies_a_typed_message_in_chromium(service):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        driver.get(service + "/")
        driver.find_element(By.ID, "text").send_keys(CHAPTER_SPAM)
        driver.find_element(By.ID, "submit").click()
        label = WebDriverWait(driver, 30).until(
            expected_conditions.presence_of_element_located((By.ID, "label"))
        )
        assert label.text == "spam"
        assert "spam probability" in driver.find_element(By.ID, "result").text
    finally:
        driver.quit()
