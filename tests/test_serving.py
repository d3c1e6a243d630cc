"""The endpoint over real HTTP: the API, batching, API keys, metrics, every bad request,
requests generated from its own OpenAPI schema, and the web page."""

from __future__ import annotations

import json
import os
import re
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from unittest import mock

import pytest

from spam_gpt.api_keys import KEYS_VARIABLE
from spam_gpt.api_models import MAX_BODY_BYTES, MAX_TEXT_CHARS, MAX_TEXTS
from spam_gpt.ray_cluster import metrics_url
from spam_gpt.server import deploy, use_high_throughput_ingress

from .conftest import CHAPTER_HAM, CHAPTER_SPAM, free_port, haproxy_running

KEY = "test-key-7f3a"  # from a key file behind Serve's proxy, from the environment behind HAProxy
APP = "https://app.example.com"  # a web app's origin allowed to call the endpoint (CORS)


@pytest.fixture(scope="module", params=[False, True], ids=["serve-proxy", "haproxy"])
def service(request, tiny_run, tmp_path_factory):
    """The endpoint behind Serve's own proxy, then behind HAProxy (``--high-throughput``),
    each on a local Ray of its own and needing an API key: every test below runs against
    both."""
    import ray
    from ray import serve

    args = {"model": str(tiny_run / "model"), "max_batch_size": 8, "allow_origins": [APP]}
    with mock.patch.dict(os.environ):  # the variables set here leave with this Ray
        if request.param:
            use_high_throughput_ingress(address=None)
            os.environ[KEYS_VARIABLE] = f"another-key,{KEY}"
        else:
            key_file = tmp_path_factory.mktemp("keys") / "api-keys"
            key_file.write_text(f"# keys for the tests\n{KEY}\nanother-key\n")
            args["api_key_file"] = str(key_file)
        url = deploy(args, "127.0.0.1", free_port(), address=None)
        yield url
        serve.shutdown()
        ray.shutdown()


def test_the_ingress_is_the_one_asked_for(service, request):
    assert haproxy_running() == request.node.callspec.params["service"]


def call(url: str, path: str, body: bytes | None = None, headers: dict | None = None, key=KEY):
    """(status, parsed JSON or text) of one request with the API key (``key=None``:
    none); errors are answers, not exceptions."""
    headers = headers or {"Content-Type": "application/json"}
    if key is not None:
        headers = {**headers, "Authorization": f"Bearer {key}"}
    request = urllib.request.Request(
        url + path, data=body, headers=headers, method="POST" if body is not None else "GET"
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


def exchange(url: str, method: str, path: str, headers: dict, body: bytes | None = None):
    """(status, headers with lower-case names) of one request."""
    request = urllib.request.Request(url + path, data=body, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}
    except urllib.error.HTTPError as error:
        return error.code, {k.lower(): v for k, v in error.headers.items()}


def test_a_web_app_on_an_allowed_origin_can_call_it_from_the_browser(service):
    """What a browser does for a page served from APP: a preflight, which carries no key,
    then the call; the answer, a refusal too, must name APP for the page to read it."""
    asks = {
        "Origin": APP,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    status, headers = exchange(service, "OPTIONS", "/classify", asks)
    assert status == 200 and headers["access-control-allow-origin"] == APP
    allowed = headers["access-control-allow-headers"].lower().replace(" ", "").split(",")
    assert {"authorization", "content-type"} <= set(allowed)
    assert "POST" in headers["access-control-allow-methods"]
    body = json.dumps({"text": CHAPTER_SPAM}).encode()
    for key, expected in ((KEY, 200), ("wrong-key", 401)):
        sent = {"Origin": APP, "Content-Type": "application/json", "Authorization": f"Bearer {key}"}
        status, headers = exchange(service, "POST", "/classify", sent, body)
        assert status == expected and headers["access-control-allow-origin"] == APP
    stranger = {**asks, "Origin": "https://elsewhere.example"}
    status, headers = exchange(service, "OPTIONS", "/classify", stranger)
    assert status == 400 and "access-control-allow-origin" not in headers


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
    text = ("free prize " * 1000)[:MAX_TEXT_CHARS]  # about 1,000 tokens, read up to 120
    status, body = post(service, "/classify", {"text": text})
    assert status == 200 and body["label"] in ("spam", "not spam")


def test_health_model_docs_and_page(service):
    assert call(service, "/healthz", key=None) == (200, {"status": "ok", "api_keys": "required"})
    status, model = call(service, "/model")
    assert status == 200 and model["reference"].endswith("model")
    assert 0.9 < model["test_accuracy"] <= 1.0 and model["config"]["token"] == "last_real"
    status, schema = call(service, "/openapi.json", key=None)
    assert status == 200 and {"/classify", "/classify/batch", "/healthz", "/model"} <= set(
        schema["paths"]
    )
    assert call(service, "/docs", key=None)[0] == 200
    status, page = call(service, "/", key=None)
    assert status == 200 and "<form" in page and "classify" in page


def test_classifying_needs_one_of_the_keys(service):
    body = json.dumps({"text": CHAPTER_SPAM}).encode()
    refusal = "this endpoint needs an API key: send Authorization: Bearer KEY"
    for path, payload in (("/classify", body), ("/classify/batch", b'{"texts": ["hi"]}')):
        assert call(service, path, payload, key=None) == (401, {"error": refusal})
        assert call(service, path, payload, key="not-a-key") == (401, {"error": refusal})
        assert call(service, path, payload, key="another-key")[0] == 200
    basic = {"Content-Type": "application/json", "Authorization": f"Basic {KEY}"}
    assert call(service, "/classify", body, headers=basic, key=None)[0] == 401
    assert call(service, "/model", key=None)[0] == 401
    _, schema = call(service, "/openapi.json", key=None)
    keyed = {
        path
        for path, ops in schema["paths"].items()
        if any("security" in op for op in ops.values())
    }
    assert keyed == {"/classify", "/classify/batch", "/model"}  # each refused above
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    request = urllib.request.Request(service + "/classify", data=body, method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=60)
    assert refused.value.headers["WWW-Authenticate"] == "Bearer"


def scrape(pattern: str, timeout: float = 90) -> list[str]:
    """The lines of Ray's Prometheus endpoint that match ``pattern``, once there are some
    (Ray exports every few seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        with urllib.request.urlopen(metrics_url(), timeout=30) as response:
            text = response.read().decode()
        lines = [line for line in text.splitlines() if re.match(pattern, line)]
        if lines or time.monotonic() > deadline:
            return lines
        time.sleep(2)


def sample_value(lines: list[str], **labels: str) -> float:
    """The sum of the samples whose labels include ``labels``."""
    wanted = [f'{name}="{value}"' for name, value in labels.items()]
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if all(w in line for w in wanted))


def test_metrics_count_predictions_batches_and_the_model(service):
    texts = [CHAPTER_SPAM, CHAPTER_HAM] * 4
    labels = [post(service, "/classify", {"text": t})[1]["label"] for t in texts]
    predictions = scrape(r"ray_spam_gpt_predictions(_total)?\{")
    for label in set(labels):  # other tests' requests count too: at least these
        assert sample_value(predictions, label=label, model_version="local") >= labels.count(label)
    batches = scrape(r"ray_spam_gpt_batch_size_bucket\{")
    assert sample_value(batches, le="+Inf") >= len(texts)
    answering = scrape(r"ray_spam_gpt_model_version_answering\{")
    assert sample_value(answering, model_name="model", model_version="local") == 1
    assert sample_value(scrape(r"ray_spam_gpt_model_load_seconds\{")) > 0
    serve_requests = scrape(r"ray_serve_deployment_request_counter(_total)?\{")
    assert sample_value(serve_requests, deployment="SpamClassifierService") >= len(texts)


def openapi_request_bodies(service: str) -> dict[str, dict]:
    """Each POST route's request schema, as one self-contained JSON Schema document."""
    status, spec = call(service, "/openapi.json", key=None)
    assert status == 200
    bodies = {}
    for path, methods in spec["paths"].items():
        if "post" in methods:
            schema = methods["post"]["requestBody"]["content"]["application/json"]["schema"]
            bodies[path] = {**schema, "components": spec["components"]}
    return bodies


def test_every_request_the_schema_allows_is_answered_2xx(service):
    from hypothesis import HealthCheck, given, settings
    from hypothesis_jsonschema import from_schema

    bodies = openapi_request_bodies(service)
    assert set(bodies) == {"/classify", "/classify/batch"}
    examples = settings(
        max_examples=30,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    for path, schema in bodies.items():

        @examples
        @given(from_schema(schema))
        def answered(payload):
            status, answer = post(service, path, payload)  # noqa: B023 (called right here)
            assert 200 <= status < 300, (path, payload, answer)  # noqa: B023

        answered()


def test_the_largest_body_the_schema_allows_is_answered(service):
    """Every text at its longest, in the characters JSON writes longest (a 12-byte
    escape pair each): still under the body limit, and classified."""
    payload = {"texts": ["\U0001f600" * MAX_TEXT_CHARS] * MAX_TEXTS}
    body = json.dumps(payload).encode()
    assert len(body) <= MAX_BODY_BYTES
    status, answer = call(service, "/classify/batch", body)
    assert status == 200 and len(answer["predictions"]) == MAX_TEXTS


BAD_REQUESTS = {
    "malformed JSON": (b'{"text": "hi"', 422, "not valid JSON: Expecting ',' delimiter at"),
    "wrong type": (b'{"text": 5}', 422, "text: Input should be a valid string"),
    "missing field": (b"{}", 422, "text: Field required"),
    "unknown field": (b'{"text": "hi", "txt": "x"}', 422, "txt: Extra inputs are not permitted"),
    "a batch sent to /classify": (
        b'{"texts": ["hi", "ho"]}',
        422,
        "texts: Extra inputs are not permitted (several messages go to POST /classify/batch)",
    ),
    "null text": (b'{"text": null}', 422, "text: Input should be a valid string"),
    "empty text": (b'{"text": ""}', 422, "text is empty"),
    "blank text": (b'{"text": "   \\n "}', 422, "text is empty"),
    "not an object": (b'["hi"]', 422, "valid dictionary"),
    "invalid UTF-8": (b'{"text": "\xff\xfe bad"}', 400, "not readable JSON"),
    "absurd nesting": (b"[" * 200_000 + b"]" * 200_000, 400, "not readable JSON"),
    # JSON that Python's reader takes but a JSON answer cannot echo back as it came
    "lone surrogate": (b'{"text": "hi \\ud800 there"}', 422, "text: Input should be a valid"),
    "lone surrogate in a field name": (b'{"text": "hi", "\\udc00": 1}', 422, "a valid string"),
    "infinite number": (b'{"text": 1e999}', 422, "text: Input should be a valid string"),
    "NaN": (b'{"text": NaN}', 422, "text: Input should be a valid string"),
    "text too long": (json.dumps({"text": "x" * (MAX_TEXT_CHARS + 1)}).encode(), 422, "at most"),
    # urllib writes all 20 MB before it reads: the 413 must still reach it, not a reset
    "body of 20 MB": (json.dumps({"text": "x" * 20_000_000}).encode(), 413, "exceeds"),
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
        ({"texts": ["fine", ""]}, "texts.1: Value error, text is empty"),
        ({"texts": ["fine", "x" * (MAX_TEXT_CHARS + 1)]}, "texts.1: String should have at most"),
        ({"texts": ["fine", None]}, "texts.1: Input should be a valid string"),
        ({"texts": "one string"}, "texts: Input should be a valid list"),
        (
            {"text": "hi"},
            "text: Extra inputs are not permitted (one message goes to POST /classify)",
        ),
    ],
)
def test_bad_batch_requests(service, payload, message):
    status, answer = post(service, "/classify/batch", payload)
    assert status == 422 and message in answer["error"]


@pytest.mark.parametrize(
    ("content_type", "expected"),
    [("application/x-www-form-urlencoded", 415), ("text/plain", 415), ("application/ld+json", 200)],
)
def test_a_body_not_sent_as_json_gets_a_415_that_names_the_header(service, content_type, expected):
    """`curl -d` and urllib send a form's type unless told otherwise."""
    body = json.dumps({"text": CHAPTER_SPAM}).encode()
    status, answer = call(service, "/classify", body, headers={"Content-Type": content_type})
    assert status == expected, answer
    if expected == 415:
        assert "Content-Type: application/json" in answer["error"]
        assert repr(content_type) in answer["error"]


def test_wrong_method_and_path_are_4xx_that_say_what_to_do(service):
    status, answer = call(service, "/classify")
    assert (
        status == 405
        and answer["error"] == "GET /classify is not allowed; /classify takes POST (see /docs)"
    )
    status, answer = call(service, "/nowhere")
    assert status == 404 and "GET /nowhere" in answer["error"] and "/docs" in answer["error"]
    head = urllib.request.Request(service + "/healthz", method="HEAD")  # load balancers' check
    with urllib.request.urlopen(head, timeout=60) as response:
        assert response.status == 200 and response.read() == b""
    status, headers = exchange(service, "OPTIONS", "/", {})  # HAProxy's default check
    assert status == 204 and headers["allow"] == "GET, OPTIONS"
    status, headers = exchange(service, "OPTIONS", "/healthz", {})
    assert status == 204 and headers["allow"] == "GET, HEAD, OPTIONS"
    status, _ = call(service, "/classify", b'{"text": "hi"}', headers={"Content-Length": "x"})
    assert 400 <= status < 500


def test_the_page_asks_for_the_key_and_classifies_a_typed_message_in_chromium(service):
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
        key_field = WebDriverWait(driver, 30).until(  # the page asks for the key
            expected_conditions.visibility_of_element_located((By.ID, "key"))
        )
        key_field.send_keys(KEY)
        driver.find_element(By.ID, "text").send_keys(CHAPTER_SPAM)
        driver.find_element(By.ID, "submit").click()
        label = WebDriverWait(driver, 30).until(
            expected_conditions.presence_of_element_located((By.ID, "label"))
        )
        assert label.text == "spam"
        assert "spam probability" in driver.find_element(By.ID, "result").text
    finally:
        driver.quit()
